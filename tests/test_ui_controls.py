"""``seesr ui``'s controls come from the options table, and its checks are the table's (no browser: Gradio's
components built alone). The page in a real browser: tests/test_ui.py."""

import pytest

from seesr_runtime import SeeSRPipeline
from seesr_runtime import options as option_table
from seesr_runtime.errors import OptionError
from seesr_runtime.lazy import available

if not available("gradio"):
    pytest.skip("gradio is not installed (the 'ui' extra: pip install '.[ui]')", allow_module_level=True)

from seesr_runtime import ui


def test_every_per_call_option_is_a_widget_or_the_servers():
    assert sorted((*ui.WIDGET_OPTIONS, *ui.SERVER_OPTIONS)) == sorted(option_table.NAMES)
    assert len(set(ui.WIDGET_OPTIONS)) == len(ui.WIDGET_OPTIONS)


@pytest.mark.parametrize("name", ui.WIDGET_OPTIONS)
def test_widget_has_the_tables_range_choices_help_and_the_given_default(name):
    option = option_table.OPTION[name]
    default = option.default if option.kind is not int else 7 if option.maximum is None else option.maximum
    widget = ui.option_widget(option, default)
    assert widget.info == option.help and widget.value == default
    if option.choices is not None:
        assert [choice[1] for choice in widget.choices] == list(option.choices)
    elif option.kind in (int, float):
        assert (widget.minimum, getattr(widget, "maximum", None)) == (option.minimum, option.maximum)


def test_raw_values_are_left_to_the_table():
    given = ui.raw_options(tuple(option_table.default(n) for n in ui.WIDGET_OPTIONS))
    assert given["steps"] == 50 and isinstance(given["steps"], int)
    values = [option_table.default(n) for n in ui.WIDGET_OPTIONS]
    values[ui.WIDGET_OPTIONS.index("steps")] = 3.0  # a browser's JSON number
    assert ui.raw_options(tuple(values))["steps"] == 3
    values[ui.WIDGET_OPTIONS.index("steps")] = 2.5
    with pytest.raises(OptionError, match=r"steps must be an integer in \[1, 999\], got 2.5"):
        option_table.check_given(ui.raw_options(tuple(values)))


@pytest.mark.parametrize("bad", [0, 11, 2.5, "3", True, None])
def test_samples_out_of_range_is_one_clear_error(bad):
    with pytest.raises(OptionError, match=r"samples must be an integer in \[1, 10\]"):
        ui.check_samples(bad)


def test_download_names_are_safe():
    assert ui.safe_stem("../../etc/pass wd.png") == "pass_wd"
    assert ui.safe_stem("") == "image" and ui.safe_stem(None) == "image"
    assert ui.safe_stem("photo.jpg") == "photo"


def test_page_opens_at_the_bundles_defaults(runtime_bundle, tmp_path):
    """The page shows the bundle's defaults: a turbo bundle's manifest records 2 steps and guidance 1.0 (the
    tiny bundle's manifest, as loaded, changed so here: building a turbo bundle takes a minute)."""
    pipe = SeeSRPipeline.from_bundle(runtime_bundle, verify="never")
    pipe.manifest.data["pipeline"]["defaults"].update(steps=2, guidance=1.0)
    pipe.manifest.data["pipeline"]["variant"] = "turbo"
    pipe.defaults = option_table.defaults_from_manifest(pipe.manifest.data["pipeline"])
    page = ui.build_page(ui.Upscaler(pipe, ui.ServerSettings(), tmp_path))
    components = page.get_config_file()["components"]
    values = {c["props"].get("elem_id"): c["props"].get("value") for c in components}
    assert values[ui.widget_id("steps")] == 2 and values[ui.widget_id("guidance")] == 1.0
    assert values[ui.widget_id("color_fix")] == pipe.defaults["color_fix"]
    assert any("turbo bundle" in str(c["props"].get("value")) for c in components)

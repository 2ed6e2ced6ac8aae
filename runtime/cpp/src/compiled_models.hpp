// Compiled models shared by threads, as seesr_runtime/compiled_models.py keeps them: one NetworkModels per
// network holds the shapes compiled for it, and an engine keeps a pool of inference requests per compiled shape
// (RequestPool), so that each call or session takes a request of its own and gives it back after.
//
// A new shape is compiled outside the network's lock, once: the first thread to ask for it compiles, a second
// asking for the same shape waits for that compile (a shared future), and calls of other shapes or networks carry
// on meanwhile. At most `capacity` shapes are kept (least recently used dropped first), never dropping one in use
// (that would free nothing, and a second copy would be compiled): the count may exceed the capacity while calls
// of several shapes run at once, and shrinks back as they end. release() drops every idle shape (what a staged
// memory plan calls when a stage ends); release_working_memory() keeps them compiled but lets the engine free
// their intermediate memory, for networks that run once per image.
#pragma once

#include <cstddef>
#include <functional>
#include <future>
#include <list>
#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <utility>
#include <vector>

namespace seesr {

// Idle inference requests of one compiled model: take() one for a call (made by `create` when none is idle),
// give_back() it after.
template <typename Request>
class RequestPool {
public:
    explicit RequestPool(std::function<Request()> create) : create_(std::move(create)) {}

    Request take() {
        {
            std::lock_guard<std::mutex> lock(mutex_);
            if (!idle_.empty()) {
                Request request = std::move(idle_.back());
                idle_.pop_back();
                return request;
            }
            ++created_;
        }
        return create_();
    }
    void give_back(Request request) {
        std::lock_guard<std::mutex> lock(mutex_);
        idle_.push_back(std::move(request));
    }
    // Drop the idle requests (and the input and output memory each holds); later calls make new ones.
    void clear() {
        std::lock_guard<std::mutex> lock(mutex_);
        idle_.clear();
    }
    // Requests made so far: the most calls that ran at once.
    std::size_t created() const {
        std::lock_guard<std::mutex> lock(mutex_);
        return created_;
    }

private:
    std::function<Request()> create_;
    mutable std::mutex mutex_;
    std::vector<Request> idle_;
    std::size_t created_ = 0;
};

template <typename Model>
class NetworkModels {
public:
    // A compiled shape in use: kept (never dropped) until this handle goes.
    class Use {
    public:
        Use(NetworkModels *owner, std::shared_ptr<Model> model) : owner_(owner), model_(std::move(model)) {}
        Use(const Use &) = delete;
        Use &operator=(const Use &) = delete;
        Use(Use &&other) noexcept : owner_(std::exchange(other.owner_, nullptr)), model_(std::move(other.model_)) {}
        ~Use() {
            if (owner_) owner_->done(model_);
        }
        Model &operator*() const { return *model_; }
        Model *operator->() const { return model_.get(); }

    private:
        NetworkModels *owner_;
        std::shared_ptr<Model> model_;
    };

    NetworkModels(std::string network, std::size_t capacity) : network_(std::move(network)), capacity_(capacity) {}
    NetworkModels(const NetworkModels &) = delete;
    NetworkModels &operator=(const NetworkModels &) = delete;

    const std::string &network() const { return network_; }

    // The model compiled for `key` (`compile()` makes it on first use), in use until the handle goes. An
    // exception from `compile` reaches every caller waiting for that key; the next call of the key compiles again.
    Use use(const std::string &key, const std::function<std::shared_ptr<Model>()> &compile) {
        std::shared_ptr<Pending> pending;
        bool owner = false;
        {
            std::lock_guard<std::mutex> lock(mutex_);
            for (auto it = ready_.begin(); it != ready_.end(); ++it) {
                if (it->key != key) continue;
                ready_.splice(ready_.end(), ready_, it);  // most recently used last
                ++it->users;
                return Use(this, it->model);
            }
            auto found = pending_.find(key);
            if (found == pending_.end()) {
                pending = std::make_shared<Pending>();
                pending_.emplace(key, pending);
                owner = true;
                drop_idle(capacity_ - 1);  // room first: never two copies of the weights
            } else {  // another thread compiles this shape: wait for it, counted as one of its users
                pending = found->second;
                ++pending->waiters;
            }
        }
        if (!owner) return Use(this, pending->future.get());  // the compiler's exception, if it failed
        std::shared_ptr<Model> model;
        try {
            model = compile();
        } catch (...) {
            {
                std::lock_guard<std::mutex> lock(mutex_);
                pending_.erase(key);
            }
            pending->promise.set_exception(std::current_exception());
            throw;
        }
        {
            std::lock_guard<std::mutex> lock(mutex_);
            pending_.erase(key);
            ++compiles_;
            ready_.push_back({key, model, 1 + pending->waiters});  // the waiters' uses start now
        }
        pending->promise.set_value(model);
        return Use(this, std::move(model));
    }

    // `free(model)` for every kept shape no call is using now, under the lock, so that no call starts on it
    // meanwhile: an engine frees the shape's intermediate memory there and keeps it compiled.
    template <typename Free>
    void release_working_memory(const Free &free) {
        std::lock_guard<std::mutex> lock(mutex_);
        for (Entry &entry : ready_) {
            if (entry.users == 0) free(*entry.model);
        }
    }
    // Drop every compiled shape no call is using now (calls in flight keep theirs until they end).
    void release() {
        std::lock_guard<std::mutex> lock(mutex_);
        drop_idle(0);
    }
    std::size_t compiles() const {
        std::lock_guard<std::mutex> lock(mutex_);
        return compiles_;
    }
    std::size_t size() const {
        std::lock_guard<std::mutex> lock(mutex_);
        return ready_.size();
    }

private:
    struct Entry {
        std::string key;
        std::shared_ptr<Model> model;
        std::size_t users;
    };
    struct Pending {
        std::promise<std::shared_ptr<Model>> promise;
        std::shared_future<std::shared_ptr<Model>> future = promise.get_future().share();
        std::size_t waiters = 0;  // guarded by the network's mutex
    };

    void done(const std::shared_ptr<Model> &model) {
        std::lock_guard<std::mutex> lock(mutex_);
        for (Entry &entry : ready_) {
            if (entry.model == model) --entry.users;
        }
        drop_idle(capacity_);
    }

    // Drop the least recently used idle shapes until at most `limit` are kept, or only shapes in use are left.
    void drop_idle(std::size_t limit) {
        for (auto it = ready_.begin(); it != ready_.end() && ready_.size() > limit;) {
            it = it->users == 0 ? ready_.erase(it) : std::next(it);
        }
    }

    std::string network_;
    std::size_t capacity_;
    mutable std::mutex mutex_;
    std::list<Entry> ready_;  // least recently used first
    std::map<std::string, std::shared_ptr<Pending>> pending_;
    std::size_t compiles_ = 0;
};

}  // namespace seesr

// Eviction policies (see pymoe-policy.h).
#include "pymoe-policy.h"

#include <stdexcept>

namespace pymoe {

namespace {

template <typename Less> size_t argmin(const slot_view * c, size_t n, Less less) {
    size_t best = 0;
    for (size_t i = 1; i < n; ++i) {
        if (less(c[i], c[best])) {
            best = i;
        }
    }
    return best;
}

class policy_lru : public eviction_policy {
  public:
    const char * name() const override { return "lru"; }

    size_t pick_victim(const slot_view * c, size_t n) const override {
        return argmin(c, n, [](const slot_view & a, const slot_view & b) { return a.last_use < b.last_use; });
    }
};

class policy_lfu : public eviction_policy {
  public:
    const char * name() const override { return "lfu"; }

    size_t pick_victim(const slot_view * c, size_t n) const override {
        return argmin(c, n, [](const slot_view & a, const slot_view & b) {
            return a.uses != b.uses ? a.uses < b.uses : a.last_use < b.last_use;
        });
    }
};

class policy_static : public eviction_policy {
  public:
    const char * name() const override { return "static"; }

    // only reached when the hot set is being placed: the coldest goes first
    size_t pick_victim(const slot_view * c, size_t n) const override {
        return argmin(c, n, [](const slot_view & a, const slot_view & b) {
            return a.profile != b.profile ? a.profile < b.profile : a.last_use < b.last_use;
        });
    }

    bool admits_on_miss() const override { return false; }
};

}  // namespace

std::unique_ptr<eviction_policy> make_eviction_policy(const std::string & name) {
    if (name == "lru") {
        return std::make_unique<policy_lru>();
    }
    if (name == "lfu") {
        return std::make_unique<policy_lfu>();
    }
    if (name == "static") {
        return std::make_unique<policy_static>();
    }
    throw std::invalid_argument("unknown cache policy '" + name + "'; hint: use lru, lfu or static");
}

std::vector<std::string> eviction_policy_names() {
    return { "lru", "lfu", "static" };
}

}  // namespace pymoe

// Eviction policies (see pymoe-policy.h).
#include "pymoe-policy.h"

#include <algorithm>
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

class policy_multidim : public eviction_policy {
  public:
    explicit policy_multidim(const multidim_weights & w) : w_(w) {}

    const char * name() const override { return "multidim"; }

    size_t pick_victim(const slot_view * c, size_t n) const override {
        // recency: the last use scaled to [0 (oldest candidate), 1 (newest)]
        uint64_t oldest = c[0].last_use, newest = c[0].last_use;
        for (size_t i = 1; i < n; ++i) {
            oldest = std::min(oldest, c[i].last_use);
            newest = std::max(newest, c[i].last_use);
        }
        std::vector<double> recency(n, 0.0);
        for (size_t i = 0; newest > oldest && i < n; ++i) {
            recency[i] = (double) (c[i].last_use - oldest) / (double) (newest - oldest);
        }
        uint64_t max_uses = 1;
        for (size_t i = 0; i < n; ++i) {
            max_uses = std::max(max_uses, c[i].uses);
        }
        size_t best       = 0;
        double best_score = 0.0;
        for (size_t i = 0; i < n; ++i) {
            const double freq  = (double) c[i].uses / (double) max_uses;
            const double prec  = c[i].uses ? (double) c[i].hi_uses / (double) c[i].uses : 0.0;
            const double score = w_.recency * recency[i] + w_.frequency * freq + w_.precision * prec;
            if (i == 0 || score < best_score) {
                best       = i;
                best_score = score;
            }
        }
        return best;
    }

  private:
    multidim_weights w_;
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

std::unique_ptr<eviction_policy> make_eviction_policy(const std::string & name, const multidim_weights & w) {
    if (name == "lru") {
        return std::make_unique<policy_lru>();
    }
    if (name == "lfu") {
        return std::make_unique<policy_lfu>();
    }
    if (name == "static") {
        return std::make_unique<policy_static>();
    }
    if (name == "multidim") {
        return std::make_unique<policy_multidim>(w);
    }
    throw std::invalid_argument("unknown cache policy '" + name + "'; hint: use lru, lfu, multidim or static");
}

std::vector<std::string> eviction_policy_names() {
    return { "lru", "lfu", "multidim", "static" };
}

}  // namespace pymoe

// Eviction policies (see pymoe-policy.h).
#include "pymoe-policy.h"

#include <algorithm>
#include <cmath>
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

class policy_lrfu : public eviction_policy {
  public:
    const char * name() const override { return "lrfu"; }

    size_t pick_victim(const slot_view * c, size_t n) const override {
        return argmin(c, n, [](const slot_view & a, const slot_view & b) {
            return a.recent != b.recent ? a.recent < b.recent : a.last_use < b.last_use;
        });
    }
};

class policy_markov : public eviction_policy {
  public:
    const char * name() const override { return "markov"; }

    size_t pick_victim(const slot_view * c, size_t n) const override {
        return argmin(c, n, [](const slot_view & a, const slot_view & b) {
            if (a.p_next != b.p_next) {
                return a.p_next < b.p_next;
            }
            return a.recent != b.recent ? a.recent < b.recent : a.last_use < b.last_use;
        });
    }

    // background admission: the newcomer must be the likelier at the next step and
    // the more used lately (p_next alone admitted too much on the fine-grained
    // traces, where the link is the limit: docs/simulate.md)
    bool admit(const slot_view & newcomer, const slot_view & victim) const override {
        return newcomer.p_next > victim.p_next && newcomer.recent > victim.recent;
    }

    bool wants_prediction() const override { return true; }
};

class policy_belady : public eviction_policy {
  public:
    const char * name() const override { return "belady"; }

    // the farthest next use goes first (an expert never used again before any)
    size_t pick_victim(const slot_view * c, size_t n) const override {
        return argmin(c, n, [](const slot_view & a, const slot_view & b) {
            return a.next_use != b.next_use ? a.next_use > b.next_use : a.last_use < b.last_use;
        });
    }

    bool admit(const slot_view & newcomer, const slot_view & victim) const override {
        return newcomer.next_use < victim.next_use;
    }

    bool needs_future() const override { return true; }
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

routing_model::transitions routing_model::empty_transitions(size_t n) {
    transitions t;
    t.to.assign(n * n, 0.0f);
    t.from.assign(n, 0.0f);
    t.stamp.assign(n, 0);
    return t;
}

routing_model::routing_model(int32_t n_layer, int32_t n_expert, double half_life, double prior, int32_t depth,
                             double base_half_life)
    : n_expert_(n_expert),
      decay_(std::exp2(-1.0 / half_life)),
      base_decay_(std::exp2(-1.0 / (base_half_life > 0 ? base_half_life : 4.0 * n_expert))),
      prior_(prior),
      layers_((size_t) n_layer),
      depth_(std::max(0, depth)),
      sum_((size_t) n_expert, 0.0f) {
    const size_t n = (size_t) n_expert;
    for (auto & l : layers_) {
        l.freq.assign(n, 0.0f);
        l.below.assign((size_t) depth_, {});
        l.same = empty_transitions(n);
        l.cross.assign((size_t) depth_, empty_transitions(n));
    }
}

void routing_model::learn(transitions & t, const weighted_set & from, const weighted_set & to, uint64_t now) const {
    const size_t n = (size_t) n_expert_;
    for (size_t i = 0; i < from.experts.size(); ++i) {
        const size_t a   = (size_t) from.experts[i];
        float *      row = t.to.data() + a * n;
        const float  f   = (float) std::pow(decay_, (double) (now - t.stamp[a]));
        for (size_t e = 0; e < n; ++e) {
            row[e] *= f;
        }
        t.from[a]  = t.from[a] * f + from.weights[i];
        t.stamp[a] = now;
        for (int32_t e : to.experts) {
            row[e] += from.weights[i];
        }
    }
}

void routing_model::predict(const transitions & t, const weighted_set & from, const std::vector<double> & base,
                            uint64_t now, std::vector<double> & p) const {
    // P(e next | from) = sum over the experts a of `from`, by weight, of the decayed
    // share of a's steps that e followed, with `prior_` steps at the base rate
    const size_t n = (size_t) n_expert_;
    p.assign(n, 0.0);
    for (size_t i = 0; i < from.experts.size(); ++i) {
        const size_t  a   = (size_t) from.experts[i];
        const double  f   = std::pow(decay_, (double) (now - t.stamp[a]));
        const double  den = f * t.from[a] + prior_;
        const float * row = t.to.data() + a * n;
        for (size_t e = 0; e < n; ++e) {
            p[e] += from.weights[i] * (f * row[e] + prior_ * base[e]) / den;
        }
    }
}

void routing_model::observe(int32_t il, const int32_t * experts, const float * weights, int64_t n_pairs) {
    if (il < 0 || il >= (int32_t) layers_.size()) {
        return;
    }
    // the step's distinct experts, their weights summing to 1
    scratch_.experts.clear();
    scratch_.weights.clear();
    double total = 0.0;
    for (int64_t p = 0; p < n_pairs; ++p) {
        const int32_t e = experts[p];
        if (e < 0 || e >= n_expert_) {
            continue;
        }
        if (sum_[(size_t) e] == 0.0f) {
            scratch_.experts.push_back(e);
        }
        const float w = std::max(weights[p], 1e-6f);
        sum_[(size_t) e] += w;
        total += w;
    }
    for (int32_t e : scratch_.experts) {
        scratch_.weights.push_back((float) (sum_[(size_t) e] / total));
        sum_[(size_t) e] = 0.0f;
    }
    layer_state &  l   = layers_[(size_t) il];
    const uint64_t now = ++l.steps;
    if (!l.last.experts.empty()) {
        learn(l.same, l.last, scratch_, now);
    }
    for (int32_t j = 0; j < depth_; ++j) {
        if (!l.below[(size_t) j].experts.empty()) {
            learn(l.cross[(size_t) j], l.below[(size_t) j], scratch_, now);
        }
    }
    for (float & f : l.freq) {
        f *= (float) base_decay_;
    }
    for (int32_t e : scratch_.experts) {
        l.freq[(size_t) e] += 1.0f;
    }
    l.freq_steps = l.freq_steps * (float) base_decay_ + 1.0f;
    // the layers observed before it in the same ubatch (lower layers) are the token's layers below
    if (!ubatch_layers_.empty() && ubatch_layers_.back() >= il) {
        ubatch_layers_.clear();  // a new ubatch
    }
    for (int32_t j = 0; j < depth_; ++j) {
        const int64_t b = (int64_t) ubatch_layers_.size() - 1 - j;
        l.below[(size_t) j] = b >= 0 ? layers_[(size_t) ubatch_layers_[(size_t) b]].last : weighted_set{};
    }
    ubatch_layers_.push_back(il);
    l.last    = scratch_;
    l.p_valid = false;
}

double routing_model::p_next(int32_t il, int32_t e) const {
    if (il < 0 || il >= (int32_t) layers_.size() || e < 0 || e >= n_expert_) {
        return 0.0;
    }
    layer_state & l = layers_[(size_t) il];
    if (!l.p_valid) {  // once per layer and step: an eviction asks for every candidate
        const size_t n = (size_t) n_expert_;
        base_.resize(n);
        for (size_t x = 0; x < n; ++x) {
            base_[x] = std::max(1e-3, l.freq_steps > 0 ? l.freq[x] / l.freq_steps : 0.0);
        }
        l.p_next.assign(base_.begin(), base_.end());
        // naive Bayes: each source's evidence as its ratio to the base rate
        for (int32_t j = -1; j < depth_; ++j) {  // -1: the layer's own last step
            const weighted_set & from = j < 0 ? l.last : l.below[(size_t) j];
            if (from.experts.empty()) {
                continue;
            }
            predict(j < 0 ? l.same : l.cross[(size_t) j], from, base_, l.steps, p_);
            for (size_t x = 0; x < n; ++x) {
                l.p_next[x] = (float) (l.p_next[x] * p_[x] / base_[x]);
            }
        }
        l.p_valid = true;
    }
    return l.p_next[(size_t) e];
}

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
    if (name == "lrfu") {
        return std::make_unique<policy_lrfu>();
    }
    if (name == "markov") {
        return std::make_unique<policy_markov>();
    }
    if (name == "belady") {
        return std::make_unique<policy_belady>();
    }
    throw std::invalid_argument("unknown cache policy '" + name +
                                "'; hint: use lru, lfu, lrfu, markov, multidim or static (belady: pymoe simulate only)");
}

std::vector<std::string> eviction_policy_names() {
    return { "lru", "lfu", "lrfu", "markov", "multidim", "static", "belady" };
}

}  // namespace pymoe

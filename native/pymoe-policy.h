// Eviction policies: which cached expert gives up its slot.
//
// A policy is a pure function of the candidates' bookkeeping; the cache owns
// that bookkeeping and asks the policy only when a slot must be freed (and,
// for background admission, whether a newcomer is worth a victim's slot).
#pragma once

#include <cstddef>
#include <cstdint>
#include <memory>
#include <string>
#include <vector>

namespace pymoe {

constexpr uint64_t k_no_next_use = UINT64_MAX;

// what the cache knows about one occupied, evictable slot
struct slot_view {
    int32_t  layer;
    int32_t  expert;
    uint64_t last_use; // step counter of its last use (larger: more recent)
    uint64_t uses;     // pairs routed to this expert since load
    double   profile;  // its weight in a recorded usage profile (0 when none)
    uint64_t hi_uses = 0; // of those, pairs that wanted high precision (gate weight at or above the threshold)
    double   recent  = 0; // pairs routed to it, each weighing half as much every half-life (expert_cache::recent)
    // the step of its next use, known only to an offline simulation (next_use_oracle);
    // k_no_next_use when it is not used again or nobody knows
    uint64_t next_use = k_no_next_use;
    // the probability that its layer's next step uses it, as the cache's
    // routing_model predicts it from the past (0 when the policy wants none)
    double   p_next   = 0;
};

// weights of the multidimensional policy's score (HOBBIT: recency, frequency, precision)
struct multidim_weights {
    double recency   = 1.0;
    double frequency = 1.0;
    double precision = 1.0;
};

class eviction_policy {
  public:
    virtual ~eviction_policy() = default;

    virtual const char * name() const = 0;

    // Index into `cands` (n > 0) of the slot to evict.
    virtual size_t pick_victim(const slot_view * cands, size_t n) const = 0;

    // Whether a missed expert may take a slot at all; a static hot set keeps
    // its slots and serves the other experts from where they live.
    virtual bool admits_on_miss() const { return true; }

    // Background admission: whether `newcomer` (just used, computed where it
    // lives) is worth the slot of `victim` (this policy's pick). By default when
    // it was used more recently-and-often (a one-off does not thrash the cache).
    virtual bool admit(const slot_view & newcomer, const slot_view & victim) const {
        return newcomer.recent > victim.recent;
    }

    // An offline policy reads slot_view::next_use: only a simulation that
    // knows the whole trace can run it (the engine refuses it).
    virtual bool needs_future() const { return false; }

    // The policy reads slot_view::p_next: the cache keeps a routing_model for it.
    virtual bool wants_prediction() const { return false; }
};

// What the past says about a layer's next step, for the "markov" policy: a
// first-order model of the routing. Decayed counts of which experts followed
// which, (a) at one layer from one step to its next and (b) from each of the
// `depth` MoE layers below it (the same token) to this layer's next step, each
// weighted by the gate weights of the experts they start from; each smoothed
// towards the layer's decayed frequency, and the sources combined as
// independent evidence (naive Bayes). Counts halve every `half_life` steps of
// their layer, the frequencies every `base_half_life` (0: 4 x n_expert steps, a
// window that grows with the experts it spreads over). Memory: 1 + depth float tables of n_expert^2 per layer
// (Mixtral: 32 x 4 x 64; 256 experts: 1 MiB a layer at depth 3).
class routing_model {
  public:
    routing_model(int32_t n_layer, int32_t n_expert, double half_life = 32.0, double prior = 4.0, int32_t depth = 3,
                  double base_half_life = 0.0);

    // Layer il's step chose these pairs: expert ids and their weights relative to
    // each token's top-k sum (as the planner weighs them).
    void observe(int32_t il, const int32_t * experts, const float * weights, int64_t n_pairs);
    // The probability that layer il's next step uses expert e.
    double p_next(int32_t il, int32_t e) const;

  private:
    struct weighted_set {
        std::vector<int32_t> experts;  // distinct
        std::vector<float>   weights;  // summing to 1
    };
    struct transitions {
        std::vector<float>    to;     // [from * n_expert + to] decayed weight of `from` followed by `to`
        std::vector<float>    from;   // [from] decayed weight of `from` being followed at all
        std::vector<uint64_t> stamp;  // [from] the layer step its row was last decayed to
    };
    struct layer_state {
        uint64_t           steps = 0;
        std::vector<float> freq;           // [n_expert] decayed steps that used each expert
        float              freq_steps = 0; // decayed steps
        weighted_set              last;   // the layer's last step
        std::vector<weighted_set> below;  // [depth] the MoE layers 1, 2 ... below it at that step (the same token)
        transitions               same;   // last -> next step
        std::vector<transitions>  cross;  // [depth] below[j] -> next step
        std::vector<float> p_next;         // [n_expert] the predictions, computed at the first ask after a step
        bool               p_valid = false;
    };

    static transitions empty_transitions(size_t n);
    void   learn(transitions & t, const weighted_set & from, const weighted_set & to, uint64_t now) const;
    void   predict(const transitions & t, const weighted_set & from, const std::vector<double> & base, uint64_t now,
                   std::vector<double> & p) const;

    int32_t                  n_expert_;
    double                   decay_;  // per layer step
    double                   base_decay_;  // of the frequencies (the base rate), per layer step
    double                   prior_;
    mutable std::vector<layer_state> layers_;  // (the predictions are cached on the first ask)
    int32_t                  depth_;
    std::vector<int32_t>     ubatch_layers_;  // the layers observed so far in this ubatch, ascending
    weighted_set             scratch_;
    std::vector<float>       sum_;  // [n_expert] scratch
    mutable std::vector<double> base_, p_;  // [n_expert] scratch
};

// "lru": least recently used. "lfu": least frequently used, ties by recency.
// "static": the hot set of a profile, loaded at start and never evicted.
// "multidim": the smallest w_r * recency + w_f * frequency + w_p * precision,
//   each normalised over the candidates to [0, 1] (recency: last use scaled
//   between the oldest and the newest candidate; frequency: uses / most uses;
//   precision: the share of uses that wanted high precision).
// "lrfu": the smallest decayed frequency (`recent`: pairs over a window that
//   halves every ~32 tokens), ties by recency: LRU's recency and LFU's
//   frequency in one score (Lee et al.'s LRFU).
// "markov": the smallest p_next (routing_model, depth 3), ties by `recent`, then by
//   recency: the expert least likely to be used at its layer's next step, as
//   this token's experts at that layer and at the three MoE layers below predict it.
//   Admits a newcomer that is both likelier next and more used lately.
// "belady": the farthest next use (never used again first), ties by recency:
//   the optimal offline choice, an upper bound for the simulator only
//   (needs_future); admits a newcomer whose next use comes before the victim's.
// Throws std::invalid_argument for another name.
std::unique_ptr<eviction_policy> make_eviction_policy(const std::string & name, const multidim_weights & w = {});

// every policy, offline ones included
std::vector<std::string> eviction_policy_names();

}  // namespace pymoe

// One MoE layer's step (see pymoe-step.h).
#include "pymoe-step.h"

#include <algorithm>
#include <stdexcept>
#include <string>

namespace pymoe {

step_planner::step_planner(int32_t n_expert)
    : n_expert_(n_expert), index_of_((size_t) n_expert, -1), hi_pairs_((size_t) n_expert, 0) {}

const step_plan & step_planner::plan(int32_t il, const int32_t * experts, const float * weights, int64_t n_tokens,
                                     int64_t n_used, expert_cache & hi, expert_cache * lo, uint64_t step,
                                     const step_config & cfg) {
    // forget the previous step's experts
    for (const auto & x : plan_.experts) {
        index_of_[(size_t) x.expert] = -1;
        hi_pairs_[(size_t) x.expert] = 0;
    }
    plan_.experts.clear();
    plan_.admitted.clear();
    plan_.admitted_slots.clear();
    plan_.evictions = plan_.upgrades = 0;

    // the distinct experts, with their token count and largest weight
    const float thr = lo ? cfg.lo_threshold : 0.0f;
    for (int64_t p = 0; p < n_tokens * n_used; ++p) {
        const int32_t e = experts[p];
        if (e < 0 || e >= n_expert_) {
            throw std::runtime_error("router chose expert " + std::to_string(e) + " in layer " + std::to_string(il));
        }
        int32_t & i = index_of_[(size_t) e];
        if (i < 0) {
            i = (int32_t) plan_.experts.size();
            plan_.experts.push_back({ e, 0, 0.0f, false, false, false });
        }
        planned_expert & x = plan_.experts[(size_t) i];
        x.n_tokens++;
        x.weight = std::max(x.weight, weights[p]);
        hi_pairs_[(size_t) e] += weights[p] >= thr;
    }

    hi.observe(il, experts, weights, n_tokens * n_used);  // a predicting policy learns the routing
    if (lo) {
        lo->observe(il, experts, weights, n_tokens * n_used);
    }

    // what the caches hold (a slot still being filled is no hit), and the uses
    int32_t hits = 0, hits_lo = 0;
    for (auto & x : plan_.experts) {
        x.cached    = hi.lookup(il, x.expert) >= 0;
        x.cached_lo = lo && lo->lookup(il, x.expert) >= 0;
        x.loading   = (!x.cached && hi.holds(il, x.expert) >= 0) || (lo && !x.cached_lo && lo->holds(il, x.expert) >= 0);
        hits += x.cached;
        hits_lo += x.cached_lo;
        hi.count(il, x.expert, (uint64_t) x.n_tokens, (uint64_t) hi_pairs_[(size_t) x.expert], step);
        if (lo) {
            lo->count(il, x.expert, (uint64_t) x.n_tokens, (uint64_t) hi_pairs_[(size_t) x.expert], step);
        }
    }

    // adaptive top-k: misses that no token of the step weighs at skip_threshold or more are left out
    plan_.skipped.assign(plan_.experts.size(), false);
    std::vector<planned_expert> kept;
    for (size_t i = 0; i < plan_.experts.size(); ++i) {
        const planned_expert & x = plan_.experts[i];
        plan_.skipped[i]         = !x.cached && !x.cached_lo && x.weight < cfg.skip_threshold;
        if (!plan_.skipped[i]) {
            kept.push_back(x);
        }
    }

    const int32_t c    = hi.class_of(il);
    const int32_t c_lo = lo ? lo->class_of(il) : -1;
    plan_request  req;
    req.experts         = std::move(kept);
    req.capacity        = (c >= 0 ? hi.cls(c).n_slots : 0) - hits;
    req.capacity_lo     = (c_lo >= 0 ? lo->cls(c_lo).n_slots : 0) - hits_lo;
    req.admit           = cfg.admit;
    req.assist          = cfg.assist;
    req.lo_threshold    = thr;
    req.expert_bytes    = cfg.expert_bytes;
    req.expert_bytes_lo = lo ? cfg.expert_bytes_lo : 0;
    req.flops_per_token = cfg.flops_per_token;
    req.cost            = cfg.cost;
    const std::vector<expert_action> planned = plan_layer(req);
    plan_.actions.resize(plan_.experts.size());
    for (size_t i = 0, k = 0; i < plan_.experts.size(); ++i) {
        plan_.actions[i] = plan_.skipped[i] ? ACTION_SKIP : planned[k++];
    }
    plan_.slots.assign(plan_.experts.size(), -1);

    // pin what the step uses before any load chooses a victim
    for (size_t i = 0; i < plan_.experts.size(); ++i) {
        const int32_t e = plan_.experts[i].expert;
        if (plan_.actions[i] == ACTION_HIT) {
            hi.touch(il, e, step);
            plan_.slots[i] = hi.lookup(il, e);
        } else if (plan_.actions[i] == ACTION_HIT_LO) {
            lo->touch(il, e, step);
            plan_.slots[i] = lo->lookup(il, e);
        }
    }
    for (size_t i = 0; i < plan_.experts.size(); ++i) {
        const planned_expert & x = plan_.experts[i];
        expert_action &        a = plan_.actions[i];
        if (a != ACTION_LOAD && a != ACTION_LOAD_LO) {
            continue;
        }
        expert_cache & cache   = a == ACTION_LOAD ? hi : *lo;
        bool           evicted = false;
        plan_.slots[i]         = cache.assign(il, x.expert, step, &evicted);
        if (plan_.slots[i] < 0) {
            a = ACTION_DIRECT;
            continue;
        }
        plan_.evictions += evicted;
        if (a == ACTION_LOAD && x.cached_lo) {  // an important expert held only in low precision
            lo->release(il, x.expert);
            plan_.upgrades++;
        }
    }

    // background admission: directly computed misses, most recently-and-often used first
    if (cfg.admit_bytes >= cfg.expert_bytes && cfg.admit && c >= 0 && hi.cls(c).n_slots > 0) {
        std::vector<size_t> cands;
        for (size_t i = 0; i < plan_.experts.size(); ++i) {
            if (plan_.actions[i] == ACTION_DIRECT && hi.holds(il, plan_.experts[i].expert) < 0) {
                cands.push_back(i);
            }
        }
        std::stable_sort(cands.begin(), cands.end(), [&](size_t a, size_t b) {
            return hi.recent(il, plan_.experts[a].expert, step) > hi.recent(il, plan_.experts[b].expert, step);
        });
        uint64_t budget = cfg.admit_bytes;
        for (size_t i : cands) {
            if (budget < cfg.expert_bytes) {
                break;
            }
            const int32_t e  = plan_.experts[i].expert;
            int32_t       vl = -1, ve = -1;
            if (hi.candidate_slot(il, step, &vl, &ve) < 0) {
                break;  // every slot is in use by this step or being filled
            }
            if (vl >= 0 && !hi.admits(il, e, vl, ve, step)) {
                continue;  // the policy says it is not worth what it would replace (a one-off does not thrash the cache)
            }
            bool          evicted = false;
            const int32_t slot    = hi.assign(il, e, step, &evicted, /*ready=*/false);
            if (slot < 0) {
                break;
            }
            plan_.evictions += evicted;
            plan_.admitted.push_back((int32_t) i);
            plan_.admitted_slots.push_back(slot);
            budget -= cfg.expert_bytes;
        }
    }
    return plan_;
}

}  // namespace pymoe

// The planner (see pymoe-planner.h).
#include "pymoe-planner.h"

#include <algorithm>
#include <numeric>

namespace pymoe {

double plan_load_seconds(const plan_request & req, int32_t n_tokens) {
    const cost_model & c = req.cost;
    double             t = c.read_bw > 0 ? (double) req.expert_bytes / c.read_bw : 0.0;
    if (c.fast_flops > 0) {
        t += n_tokens * req.flops_per_token / c.fast_flops;
    }
    return t;
}

double plan_direct_seconds(const plan_request & req, int32_t n_tokens) {
    const cost_model & c = req.cost;
    double             t = c.direct_bw > 0 ? (double) req.expert_bytes / c.direct_bw : 0.0;
    if (c.slow_flops > 0) {
        t += n_tokens * req.flops_per_token / c.slow_flops;
    }
    return t;
}

std::vector<expert_action> plan_layer(const plan_request & req) {
    const size_t               n = req.experts.size();
    std::vector<expert_action> out(n, ACTION_DIRECT);
    std::vector<size_t>        misses;
    for (size_t i = 0; i < n; ++i) {
        if (req.experts[i].cached) {
            out[i] = ACTION_HIT;
        } else {
            misses.push_back(i);
        }
    }
    std::stable_sort(misses.begin(), misses.end(), [&](size_t a, size_t b) {
        const planned_expert & x = req.experts[a];
        const planned_expert & y = req.experts[b];
        if (x.n_tokens != y.n_tokens) {
            return x.n_tokens > y.n_tokens;
        }
        return x.weight > y.weight;
    });
    int32_t capacity = req.capacity;
    for (size_t i : misses) {
        if (!req.admit || capacity <= 0) {
            break;
        }
        const int32_t nt    = req.experts[i].n_tokens;
        const double  reuse = std::max(1.0, req.cost.reuse);
        if (!req.assist || plan_load_seconds(req, nt) <= plan_direct_seconds(req, nt) * reuse) {
            out[i] = ACTION_LOAD;
            --capacity;
        }
    }
    return out;
}

}  // namespace pymoe

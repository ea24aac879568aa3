// The planner (see pymoe-planner.h).
#include "pymoe-planner.h"

#include <algorithm>

namespace pymoe {

double plan_load_seconds(const plan_request & req, int32_t n_tokens, bool lo) {
    const cost_model & c     = req.cost;
    const uint64_t     bytes = lo ? req.expert_bytes_lo : req.expert_bytes;
    double             t     = c.read_bw > 0 ? (double) bytes / c.read_bw : 0.0;
    if (c.fast_flops > 0) {
        t += n_tokens * req.flops_per_token / c.fast_flops;
    }
    return t;
}

double plan_direct_seconds(const plan_request & req, int32_t n_tokens) {
    const cost_model & c = req.cost;
    if (c.offload_min_batch > 0 && n_tokens >= c.offload_min_batch) {
        // upstream's op_offload: the device computes it after a copy over the link, as a load would
        return plan_load_seconds(req, n_tokens);
    }
    double t = c.direct_bw > 0 ? (double) req.expert_bytes / c.direct_bw : 0.0;
    if (c.slow_flops > 0) {
        t += n_tokens * req.flops_per_token / c.slow_flops;
    }
    return t;
}

void relative_gate_weights(float * w, int64_t n_tokens, int64_t n_used) {
    for (int64_t t = 0; t < n_tokens; ++t) {
        float * row = w + t * n_used;
        double  sum = 0.0;
        for (int64_t i = 0; i < n_used; ++i) {
            sum += std::max(row[i], 0.0f);
        }
        if (sum > 0.0) {
            for (int64_t i = 0; i < n_used; ++i) {
                row[i] = (float) (std::max(row[i], 0.0f) / sum);
            }
        }
    }
}

std::vector<expert_action> plan_layer(const plan_request & req) {
    const size_t               n = req.experts.size();
    std::vector<expert_action> out(n, ACTION_DIRECT);
    std::vector<size_t>        misses;
    for (size_t i = 0; i < n; ++i) {
        const planned_expert & x         = req.experts[i];
        const bool             important = x.weight >= req.lo_threshold;
        if (x.cached) {
            out[i] = ACTION_HIT;
        } else if (x.cached_lo && !important) {
            out[i] = ACTION_HIT_LO;
        } else if (!x.loading) {
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
    int32_t      cap_hi = req.capacity;
    int32_t      cap_lo = req.capacity_lo;
    const double reuse  = std::max(1.0, req.cost.reuse);
    for (size_t i : misses) {
        if (!req.admit) {
            break;
        }
        const planned_expert & x        = req.experts[i];
        const double           t_direct = plan_direct_seconds(req, x.n_tokens) * reuse;
        const bool             want_lo  = x.weight < req.lo_threshold && req.expert_bytes_lo > 0;
        if (want_lo && cap_lo > 0 && (!req.assist || plan_load_seconds(req, x.n_tokens, true) <= t_direct)) {
            out[i] = ACTION_LOAD_LO;
            --cap_lo;
        } else if (cap_hi > 0 && (!req.assist || plan_load_seconds(req, x.n_tokens) <= t_direct)) {
            out[i] = ACTION_LOAD;
            --cap_hi;
        }
    }
    return out;
}

}  // namespace pymoe

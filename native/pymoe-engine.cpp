// The expert-offload engine (see pymoe-engine.h).
#include "pymoe-engine.h"

#include "ggml-alloc.h"
#include "ggml-backend.h"
#include "ggml-cpu.h"
#include "ggml.h"

#include <algorithm>
#include <chrono>
#include <cstring>
#include <stdexcept>

namespace pymoe {

llama_moe_hook * make_moe_hook(engine & eng);  // pymoe-hook.cpp

namespace {

using clock_type = std::chrono::steady_clock;

double seconds_since(clock_type::time_point t0) {
    return std::chrono::duration<double>(clock_type::now() - t0).count();
}

constexpr const char * k_route_prefix = "pymoe_route-";

// the sidecar must hold the same experts as the main file, in any type
void check_sidecar_layout(const expert_store & main, const expert_store & lo) {
    for (const auto & l : main.layers()) {
        if (l.il < 0) {
            continue;
        }
        const expert_layer * s = lo.layer(l.il);
        bool                 ok = s && s->projs.size() == l.projs.size();
        for (size_t i = 0; ok && i < l.projs.size(); ++i) {
            ok = s->projs[i].kind == l.projs[i].kind && s->projs[i].ne[0] == l.projs[i].ne[0] &&
                 s->projs[i].ne[1] == l.projs[i].ne[1];
        }
        if (!ok) {
            throw std::invalid_argument("the sidecar '" + lo.path() + "' does not hold the experts of layer " +
                                        std::to_string(l.il) + " of '" + main.path() +
                                        "'; hint: build the sidecar from this model (pymoe convert --sidecar-only)");
        }
    }
}

}  // namespace

engine::engine(const std::string & path, const offload_params & params, int32_t n_layer, int32_t n_expert,
               int32_t n_expert_used, int64_t n_embd, int32_t n_tokens_max, ggml_backend_buffer_type_t buft_fast)
    : params_(params),
      n_layer_(n_layer),
      n_expert_(n_expert),
      n_expert_used_(n_expert_used),
      n_embd_(n_embd),
      n_tokens_max_(n_tokens_max) {
    if (n_expert <= 0 || n_expert_used <= 0) {
        throw std::invalid_argument("'" + path +
                                    "' has no routed experts; hint: offloading is for MoE models, turn it off");
    }
    if (params.tier != "disk" && params.tier != "host") {
        throw std::invalid_argument("unknown offload tier '" + params.tier + "'; hint: use disk or host");
    }
    if (params.lo_share < 0.0 || params.lo_share > 1.0 || params.lo_threshold < 0.0f) {
        throw std::invalid_argument("lo_share must be in [0, 1] and lo_threshold >= 0");
    }
    release_direct_ = params.tier == "disk";
    store_ = std::make_unique<expert_store>(path, n_layer, n_expert, params.direct_io, params.io_threads,
                                            params.tier == "host");
    const multidim_weights mw{ params.w_recency, params.w_frequency, params.w_precision };
    uint64_t budget_hi = params.budget;
    if (!params.lo_path.empty()) {
        store_lo_ = std::make_unique<expert_store>(params.lo_path, n_layer, n_expert, params.direct_io,
                                                   params.io_threads, false);
        check_sidecar_layout(*store_, *store_lo_);
        const uint64_t budget_lo = (uint64_t) (params.lo_share * (double) params.budget);
        budget_hi -= budget_lo;
        cache_lo_ = std::make_unique<expert_cache>(store_lo_->layers(), n_expert, budget_lo, buft_fast,
                                                   make_eviction_policy(params.policy, mw), params.profile, true,
                                                   params.per_layer);
    }
    cache_ = std::make_unique<expert_cache>(store_->layers(), n_expert, budget_hi, buft_fast,
                                            make_eviction_policy(params.policy, mw), params.profile, true,
                                            params.per_layer);
    if (params.prefetch) {
        prefetcher::targets t{ cache_.get(), store_.get(), cache_lo_.get(), store_lo_.get(),
                               cache_lo_ ? params.lo_threshold : 0.0f };
        prefetcher_ = std::make_unique<prefetcher>(n_layer, n_embd, n_expert_used, std::max(1, params.io_threads / 2),
                                                   params.prefetch_depth, params.prefetch_max_tokens, t);
    }
    hook_.reset(make_moe_hook(*this));

    // persistent id tensors: written by on_route, read by the layer's matmuls
    // (not graph inputs: the scheduler copies inputs before a split starts,
    // which is before the callback has written them)
    const size_t     n_tensors = (size_t) n_layer * 5;
    ggml_init_params ip        = { ggml_tensor_overhead() * (n_tensors + 1), nullptr, true };
    ids_ctx_.reset(ggml_init(ip));
    plan_tensors_.resize((size_t) n_layer);
    for (int32_t il = 0; il < n_layer; ++il) {
        if (!store_->layer(il)) {
            continue;
        }
        auto make = [&](const char * what) {
            // [n_used, n_tokens_max]
            ggml_tensor * t = ggml_new_tensor_2d(ids_ctx_.get(), GGML_TYPE_I32, n_expert_used, n_tokens_max);
            ggml_format_name(t, "pymoe_%s-%d", what, il);
            t->flags |= GGML_TENSOR_FLAG_SKIP_IDS;  // -1 skips a pair: backends take their skip-aware path
            return t;
        };
        plan_tensors_[il] = { make("ids_pool"), make("ids_pool_b"), make("ids_lo"), make("ids_lo_b"),
                              make("ids_direct") };
    }
    // the fast tier is host memory here (the CPU backend reads the ids)
    ids_buf_.reset(ggml_backend_alloc_ctx_tensors_from_buft(ids_ctx_.get(), ggml_backend_cpu_buffer_type()));
    if (!ids_buf_) {
        throw std::runtime_error("cannot allocate the expert plan tensors");
    }
    ggml_backend_buffer_clear(ids_buf_.get(), 0xFF);  // -1 everywhere until a plan is written

    if (!params.replay.empty()) {
        const size_t row = (size_t) n_layer * (size_t) n_expert_used;
        if (params.replay.size() % row != 0) {
            throw std::invalid_argument("the replay trace is not [rows, " + std::to_string(n_layer) + ", " +
                                        std::to_string(n_expert_used) +
                                        "]; hint: fit it to the model's layers and top-k");
        }
        for (int32_t e : params.replay) {
            if (e < 0 || e >= n_expert) {
                throw std::invalid_argument("the replay trace names expert " + std::to_string(e) +
                                            " of a model with " + std::to_string(n_expert));
            }
        }
        if (!params.replay_weights.empty() && params.replay_weights.size() != params.replay.size()) {
            throw std::invalid_argument("the replay trace's weights and experts differ in shape");
        }
        replay_cursor_.assign((size_t) n_layer, 0);
    }
    route_.assign((size_t) n_layer, layer_route_tensors{});
    layer_stats_.assign((size_t) n_layer, layer_stats{});
    count_.assign((size_t) n_expert, 0);
    wmax_.assign((size_t) n_expert, 0.0f);
    hi_pairs_.assign((size_t) n_expert, 0);
    action_of_.assign((size_t) n_expert, -1);
    slot_of_.assign((size_t) n_expert, -1);
}

engine::~engine() {
    prefetcher_.reset();  // joins the background loader before the pools go
    release_direct();
}

void engine::start() {
    started_ = true;
    // the cost model, measured: a disk-tier load reads the file, and so does the
    // direct branch (through the mapping); a host-tier load copies in memory and
    // the direct branch reads the weights in place; both compute on the CPU
    cost_.read_bw   = store_->measure_read_bandwidth(std::min<uint64_t>(64ull << 20, store_->total_expert_bytes()));
    cost_.direct_bw = release_direct_ ? cost_.read_bw : 0.0;
    reuse_.set_share(store_->total_expert_bytes()
                         ? (double) cache_->allocated_bytes() / (double) store_->total_expert_bytes() : 0.0);

    if (!cache_->policy().admits_on_miss()) {
        std::vector<expert_store::read_job> jobs;
        for (const auto & [il, e] : cache_->hot_set()) {
            bool          evicted = false;
            const int32_t slot    = cache_->assign(il, e, 0, &evicted);
            if (slot >= 0) {
                jobs.push_back({ il, e, cache_->slot_dst(cache_->class_of(il), slot, *store_->layer(il)) });
            }
        }
        store_->read_experts(jobs);
    }
}

bool engine::eval_callback(ggml_tensor * t, bool ask, void * user_data) {
    if (strncmp(t->name, k_route_prefix, strlen(k_route_prefix)) != 0) {
        return !ask;  // not ours: asked, "no"; told (never), "go on"
    }
    if (ask) {
        return true;
    }
    auto * eng = static_cast<engine *>(user_data);
    eng->on_route((int32_t) atoi(t->name + strlen(k_route_prefix)));
    return true;  // false would stop the graph
}

void engine::on_layer_built(const built_layer & v) {
    const expert_layer * el = store_->layer(v.il);
    GGML_ASSERT(el);
    for (const auto & p : el->projs) {
        store_->set_host(v.il, p.kind, v.expert_data[p.kind]);
    }
    route_[v.il] = v.route;
    ggml_format_name(v.route.weights, "%s%d", k_route_prefix, v.il);
    if (prefetcher_) {
        prefetcher_->predictor().set_router(v.il, v.gate_inp, v.exp_probs_b, v.gating);
    }
}

//
// reading the router's outputs
//

namespace {

// the bytes of a (possibly strided) tensor, wherever it lives
const uint8_t * tensor_bytes(const ggml_tensor * t, std::vector<uint8_t> & tmp) {
    if (t->buffer == nullptr || ggml_backend_buffer_is_host(t->buffer)) {
        return static_cast<const uint8_t *>(t->data);
    }
    size_t span = ggml_type_size(t->type);
    for (int d = 0; d < GGML_MAX_DIMS; ++d) {
        span += (size_t) (t->ne[d] - 1) * t->nb[d];
    }
    tmp.resize(span);
    ggml_backend_tensor_get(t, tmp.data(), 0, span);
    return tmp.data();
}

}  // namespace

void engine::read_ids(const ggml_tensor * t, std::vector<int32_t> & out) const {
    // [n_used, n_tokens], possibly a strided view (the top-k of an argsort)
    std::vector<uint8_t> tmp;
    const uint8_t *      base = tensor_bytes(t, tmp);
    const int64_t        n0 = t->ne[0], n1 = t->ne[1];
    out.resize((size_t) (n0 * n1));
    for (int64_t j = 0; j < n1; ++j) {
        for (int64_t i = 0; i < n0; ++i) {
            out[(size_t) (j * n0 + i)] = *reinterpret_cast<const int32_t *>(base + j * t->nb[1] + i * t->nb[0]);
        }
    }
}

void engine::read_weights(const ggml_tensor * t, std::vector<float> & out) const {
    // [1, n_used, n_tokens]
    std::vector<uint8_t> tmp;
    const uint8_t *      base = tensor_bytes(t, tmp);
    const int64_t        n_used = t->ne[1], n_tokens = t->ne[2];
    out.resize((size_t) (n_used * n_tokens));
    for (int64_t j = 0; j < n_tokens; ++j) {
        for (int64_t i = 0; i < n_used; ++i) {
            out[(size_t) (j * n_used + i)] = *reinterpret_cast<const float *>(base + j * t->nb[2] + i * t->nb[1]);
        }
    }
}

void engine::read_input(const ggml_tensor * t, std::vector<float> & out) const {
    // [n_embd, 1, n_tokens]
    std::vector<uint8_t> tmp;
    const uint8_t *      base = tensor_bytes(t, tmp);
    const int64_t        n_tokens = t->ne[2] * t->ne[1];
    out.resize((size_t) (t->ne[0] * n_tokens));
    for (int64_t j = 0; j < t->ne[2]; ++j) {
        for (int64_t r = 0; r < t->ne[1]; ++r) {
            memcpy(out.data() + (j * t->ne[1] + r) * t->ne[0], base + j * t->nb[2] + r * t->nb[1],
                   (size_t) t->ne[0] * sizeof(float));
        }
    }
}

void engine::write_ids(ggml_tensor * t, const std::vector<int32_t> & ids, int64_t n) const {
    // the graph reads a contiguous prefix view [n_used, n_tokens] of t
    ggml_backend_tensor_set(t, ids.data(), 0, (size_t) n * sizeof(int32_t));
}

void engine::release_direct() {
    if (release_direct_) {
        for (const auto & [il, e] : pending_release_) {
            store_->release(il, e);
        }
    }
    pending_release_.clear();
}

//
// background loads
//

//
// the sync point
//

void engine::on_route(int32_t il) {
    if (!started_) {
        try {
            start();
        } catch (const std::exception & ex) {
            error_ = std::string("expert offload start-up: ") + ex.what();
        }
    }
    const auto t0 = clock_type::now();
    // the previous layer's experts have been computed by now (graph order)
    release_direct();

    const layer_route_tensors & rt = route_[il];
    if (!store_->layer(il) || !rt.selected || !rt.weights) {
        return;
    }
    const int64_t  n_used   = rt.selected->ne[0];
    const int64_t  n_tokens = rt.selected->ne[1];
    const int64_t  n_pairs  = n_used * n_tokens;
    const uint64_t step     = ++step_;

    layer_stats ls;
    double      load_seconds = 0.0;
    try {
        read_ids(rt.selected, sel_);
        read_weights(rt.weights, w_);
        if (!replay_cursor_.empty()) {
            // benchmark mode: the trace's experts replace the router's choice
            // (and, when it has them, its gate weights what the planner weighs)
            const uint64_t rows = params_.replay.size() / ((size_t) n_layer_ * (size_t) n_used);
            const bool     with_weights = !params_.replay_weights.empty();
            for (int64_t t = 0; t < n_tokens; ++t) {
                const uint64_t row = (replay_cursor_[il] + (uint64_t) t) % rows;
                for (int64_t i = 0; i < n_used; ++i) {
                    const uint64_t at = (row * (uint64_t) n_layer_ + (uint64_t) il) * (uint64_t) n_used + (uint64_t) i;
                    sel_[(size_t) (t * n_used + i)] = params_.replay[at];
                    if (with_weights) {
                        w_[(size_t) (t * n_used + i)] = params_.replay_weights[at];
                    }
                }
            }
            replay_cursor_[il] += (uint64_t) n_tokens;
        }
        relative_gate_weights(w_.data(), n_tokens, n_used);
        plan_step(il, n_used, n_tokens, step, ls, load_seconds);
        if (prefetcher_ && rt.input && n_tokens <= params_.prefetch_max_tokens) {
            read_input(rt.input, x_);
            prefetcher_->after_plan(il, x_.data(), n_tokens, step);
            const std::string e = prefetcher_->take_error();
            if (!e.empty() && error_.empty()) {
                error_ = e;
            }
        }
    } catch (const std::exception & ex) {
        // never throw through ggml: serve every pair from the model's tensors
        // (always correct) and report the failure after the decode
        if (error_.empty()) {
            error_ = "expert offload, layer " + std::to_string(il) + ": " + ex.what();
        }
        ids_pool_.assign((size_t) n_pairs, -1);
        ids_pool_b_.assign((size_t) n_pairs, -1);
        ids_lo_.assign((size_t) n_pairs, -1);
        ids_lo_b_.assign((size_t) n_pairs, -1);
        ids_direct_.assign((size_t) n_pairs, -1);  // an id out of range would be read out of bounds: skip it
        for (size_t p = 0; p < ids_direct_.size() && p < sel_.size(); ++p) {
            if (sel_[p] >= 0 && sel_[p] < n_expert_) {
                ids_direct_[p] = sel_[p];
            }
        }
        ls              = layer_stats{};
        ls.direct_pairs = (uint64_t) n_pairs;
    }
    const layer_plan_tensors & pt = plan_tensors_[il];
    write_ids(pt.ids_pool, ids_pool_, n_pairs);
    write_ids(pt.ids_pool_b, ids_pool_b_, n_pairs);
    write_ids(pt.ids_lo, ids_lo_, n_pairs);
    write_ids(pt.ids_lo_b, ids_lo_b_, n_pairs);
    write_ids(pt.ids_direct, ids_direct_, n_pairs);

    // reset the per-step scratch
    for (int64_t p = 0; p < n_pairs && p < (int64_t) sel_.size(); ++p) {
        const int32_t e = sel_[p];
        if (e >= 0 && e < n_expert_) {
            count_[e]     = 0;
            wmax_[e]      = 0.0f;
            hi_pairs_[e]  = 0;
            action_of_[e] = -1;
            slot_of_[e]   = -1;
        }
    }

    ls.steps        = 1;
    ls.pairs        = (uint64_t) n_pairs;
    ls.load_seconds = load_seconds;
    ls.plan_seconds = seconds_since(t0) - load_seconds - ls.prefetch_wait_seconds;
    std::lock_guard<std::mutex> lock(stats_mutex_);
    layer_stats_[il] += ls;
}

void engine::plan_step(int32_t il, int64_t n_used, int64_t n_tokens, uint64_t step, layer_stats & ls,
                       double & load_seconds) {
    const int64_t        n_pairs = n_used * n_tokens;
    const expert_layer & layer   = *store_->layer(il);
    const float          thr     = cache_lo_ ? params_.lo_threshold : 0.0f;

    // the distinct experts of this step, with their token count and largest weight
    std::vector<planned_expert> experts;
    for (int64_t p = 0; p < n_pairs; ++p) {
        const int32_t e = sel_[p];
        if (e < 0 || e >= n_expert_) {
            throw std::runtime_error("router chose expert " + std::to_string(e) + " in layer " + std::to_string(il));
        }
        if (count_[e]++ == 0) {
            experts.push_back({ e, 0, 0.0f, false, false });
        }
        const float w = p < (int64_t) w_.size() ? w_[p] : 0.0f;
        wmax_[e]      = std::max(wmax_[e], w);
        hi_pairs_[e] += w >= thr;
    }

    // what the predictions made for this layer got right; their loads must have landed
    if (prefetcher_) {
        chosen_.clear();
        for (const auto & x : experts) {
            chosen_.push_back(x.expert);
        }
        prefetcher_->before_plan(il, chosen_, ls);
    }

    const int32_t c       = cache_->class_of(il);
    const int32_t c_lo    = cache_lo_ ? cache_lo_->class_of(il) : -1;
    const int32_t n_slots = c >= 0 ? cache_->cls(c).n_slots : 0;
    const int32_t n_lo    = c_lo >= 0 ? cache_lo_->cls(c_lo).n_slots : 0;
    int32_t       hits = 0, hits_lo = 0;
    for (auto & x : experts) {
        x.n_tokens  = count_[x.expert];
        x.weight    = wmax_[x.expert];
        x.cached    = cache_->lookup(il, x.expert) >= 0;
        x.cached_lo = cache_lo_ && cache_lo_->lookup(il, x.expert) >= 0;
        hits += x.cached;
        hits_lo += x.cached_lo;
        cache_->count(il, x.expert, (uint64_t) x.n_tokens, (uint64_t) hi_pairs_[x.expert]);
        if (cache_lo_) {
            cache_lo_->count(il, x.expert, (uint64_t) x.n_tokens, (uint64_t) hi_pairs_[x.expert]);
        }
    }

    plan_request req;
    req.experts         = experts;
    req.capacity        = n_slots - hits;
    req.capacity_lo     = n_lo - hits_lo;
    req.admit           = cache_->policy().admits_on_miss();
    req.assist          = params_.cpu_assist;
    req.lo_threshold    = thr;
    req.expert_bytes    = layer.expert_bytes;
    req.expert_bytes_lo = cache_lo_ ? store_lo_->layer(il)->expert_bytes : 0;
    req.cost            = cost_;
    req.cost.reuse      = reuse_.estimate();
    const std::vector<expert_action> actions = plan_layer(req);

    // pin what the step uses before any load chooses a victim
    for (size_t i = 0; i < experts.size(); ++i) {
        if (actions[i] == ACTION_HIT) {
            cache_->touch(il, experts[i].expert, step);
        } else if (actions[i] == ACTION_HIT_LO) {
            cache_lo_->touch(il, experts[i].expert, step);
        }
    }
    std::vector<expert_store::read_job> jobs, jobs_lo;
    for (size_t i = 0; i < experts.size(); ++i) {
        const int32_t e    = experts[i].expert;
        expert_action a    = actions[i];
        int32_t       slot = -1;
        bool          evicted = false;
        switch (a) {
            case ACTION_HIT:
                slot = cache_->lookup(il, e);
                ++ls.hits;
                break;
            case ACTION_HIT_LO:
                slot = cache_lo_->lookup(il, e);
                ++ls.hits_lo;
                break;
            case ACTION_LOAD:
                slot = cache_->assign(il, e, step, &evicted);
                if (slot >= 0) {
                    jobs.push_back({ il, e, cache_->slot_dst(c, slot, layer) });
                    ++ls.loads;
                    ls.evictions += evicted;
                    ls.bytes_loaded += layer.expert_bytes;
                    if (experts[i].cached_lo) {  // an important expert held only in low precision
                        cache_lo_->release(il, e);
                        ++ls.upgrades;
                    }
                } else {
                    a = ACTION_DIRECT;
                }
                break;
            case ACTION_LOAD_LO:
                slot = cache_lo_->assign(il, e, step, &evicted);
                if (slot >= 0) {
                    jobs_lo.push_back({ il, e, cache_lo_->slot_dst(c_lo, slot, *store_lo_->layer(il)) });
                    ++ls.loads_lo;
                    ls.evictions += evicted;
                    ls.bytes_loaded_lo += store_lo_->layer(il)->expert_bytes;
                } else {
                    a = ACTION_DIRECT;
                }
                break;
            default:
                break;
        }
        if (a != ACTION_HIT && a != ACTION_HIT_LO) {
            ++ls.misses;
        }
        if (a == ACTION_DIRECT) {
            ++ls.direct;
            ls.bytes_direct += layer.expert_bytes;
            if (release_direct_) {
                store_->advise_willneed(il, e);
            }
            pending_release_.emplace_back(il, e);
        }
        action_of_[e] = a;
        slot_of_[e]   = slot;
    }

    reuse_.observe(ls.hits + ls.hits_lo, ls.loads + ls.loads_lo);
    if (!jobs.empty() || !jobs_lo.empty()) {
        const auto t1 = clock_type::now();
        store_->read_experts(jobs);
        if (!jobs_lo.empty()) {
            store_lo_->read_experts(jobs_lo);
        }
        load_seconds = seconds_since(t1);
    }

    ids_pool_.resize((size_t) n_pairs);
    ids_pool_b_.resize((size_t) n_pairs);
    ids_lo_.resize((size_t) n_pairs);
    ids_lo_b_.resize((size_t) n_pairs);
    ids_direct_.resize((size_t) n_pairs);
    for (int64_t p = 0; p < n_pairs; ++p) {
        const int32_t e  = sel_[p];
        const int     a  = action_of_[e];
        const bool    hi = a == ACTION_HIT || a == ACTION_LOAD;
        const bool    lo = a == ACTION_HIT_LO || a == ACTION_LOAD_LO;
        ids_pool_[p]     = hi ? slot_of_[e] : -1;
        ids_pool_b_[p]   = hi ? e : -1;
        ids_lo_[p]       = lo ? slot_of_[e] : -1;
        ids_lo_b_[p]     = lo ? e : -1;
        ids_direct_[p]   = hi || lo ? -1 : e;
        ls.pool_pairs += hi;
        ls.lo_pairs += lo;
        ls.direct_pairs += !hi && !lo;
    }
}

void engine::end_batch() {
    release_direct();
    if (!error_.empty()) {
        std::string e;
        std::swap(e, error_);
        throw std::runtime_error(e + "; the affected layers were computed from the model file instead");
    }
}

offload_stats engine::stats() const {
    offload_stats s;
    s.tier           = params_.tier;
    s.budget         = params_.budget;
    s.pool_bytes     = cache_->allocated_bytes();
    s.n_slots        = cache_->n_slots();
    s.n_layer        = n_layer_;
    s.n_expert       = n_expert_;
    s.policy         = cache_->policy().name();
    s.read_bandwidth = cost_.read_bw;
    s.pool_bytes_lo  = cache_lo_ ? cache_lo_->allocated_bytes() : 0;
    s.n_slots_lo     = cache_lo_ ? cache_lo_->n_slots() : 0;
    s.lo_threshold   = cache_lo_ ? params_.lo_threshold : 0.0f;
    s.prefetch       = prefetcher_ != nullptr;
    s.prefetch_busy_seconds = prefetcher_ ? prefetcher_->busy_seconds() : 0.0;
    {
        std::lock_guard<std::mutex> lock(stats_mutex_);
        s.layers = layer_stats_;
    }
    if (prefetcher_) {
        for (int32_t il = 0; il < n_layer_; ++il) {
            s.layers[il] += prefetcher_->layer_counters(il);
        }
    }
    s.expert_pairs.resize((size_t) n_layer_ * (size_t) n_expert_);
    for (int32_t il = 0; il < n_layer_; ++il) {
        for (int32_t e = 0; e < n_expert_; ++e) {
            s.expert_pairs[(size_t) il * n_expert_ + e] = store_->layer(il) ? cache_->uses(il, e) : 0;
        }
    }
    return s;
}

void engine::reset_stats() {
    std::lock_guard<std::mutex> lock(stats_mutex_);
    layer_stats_.assign((size_t) n_layer_, layer_stats{});
    if (prefetcher_) {
        prefetcher_->reset_counters();
    }
}

//
// how a budget splits (pymoe info --expert-budget)
//

std::vector<pool_plan> offload_plan(const std::string & path, uint64_t budget, uint64_t * planned_bytes,
                                    bool per_layer) {
    const gguf_info info = gguf_read_info(path, 0);
    std::string     arch;
    int64_t         n_layer = 0, n_expert = 0;
    for (const auto & [key, v] : info.kv) {
        if (key == "general.architecture") {
            arch = std::get<std::string>(v.scalar);
        }
    }
    for (const auto & [key, v] : info.kv) {
        auto as_int = [&]() -> int64_t {
            if (auto * u = std::get_if<uint64_t>(&v.scalar)) {
                return (int64_t) *u;
            }
            if (auto * i = std::get_if<int64_t>(&v.scalar)) {
                return *i;
            }
            return 0;
        };
        if (key == arch + ".block_count") {
            n_layer = as_int();
        } else if (key == arch + ".expert_count") {
            n_expert = as_int();
        }
    }
    if (n_expert <= 0) {
        throw std::invalid_argument("'" + path + "' has no routed experts; hint: offloading is for MoE models");
    }
    expert_store store(path, (int32_t) n_layer, (int32_t) n_expert, false, 1);
    expert_cache cache(store.layers(), (int32_t) n_expert, budget, ggml_backend_cpu_buffer_type(),
                       make_eviction_policy("lru"), {}, false, per_layer);
    std::vector<pool_plan> out;
    for (int32_t c = 0; c < cache.n_classes(); ++c) {
        const pool_class & pc = cache.cls(c);
        out.push_back({ pc.layers, pc.slot_bytes, pc.n_slots, (int32_t) (pc.layers.size() * n_expert) });
    }
    if (planned_bytes) {
        *planned_bytes = cache.planned_bytes();
    }
    return out;
}

}  // namespace pymoe

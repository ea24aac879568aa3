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
               int32_t n_expert_used, int64_t n_embd, int32_t n_tokens_max, int32_t n_threads,
               const std::vector<ggml_backend_dev_t> & layer_dev)
    : params_(params),
      n_layer_(n_layer),
      n_expert_(n_expert),
      n_expert_used_(n_expert_used),
      n_embd_(n_embd),
      n_tokens_max_(n_tokens_max),
      n_threads_(std::max(1, n_threads)),
      planner_(n_expert) {
    if (n_expert <= 0 || n_expert_used <= 0) {
        throw std::invalid_argument("'" + path +
                                    "' has no routed experts; hint: offloading is for MoE models, turn it off");
    }
    if (params.tier != "disk" && params.tier != "host") {
        throw std::invalid_argument("unknown offload tier '" + params.tier + "'; hint: use disk or host");
    }
    if (make_eviction_policy(params.policy)->needs_future()) {
        throw std::invalid_argument("the " + params.policy + " policy reads the future of a routing trace: it is "
                                    "the simulator's upper bound; hint: run it with pymoe simulate, and pick an "
                                    "online policy (lrfu, lru, lfu, multidim) for a model");
    }
    if (params.lo_share < 0.0 || params.lo_share > 1.0 || params.lo_threshold < 0.0f) {
        throw std::invalid_argument("lo_share must be in [0, 1] and lo_threshold >= 0");
    }
    if (!(params.skip_threshold >= 0.0f && params.skip_threshold < 1.0f)) {
        throw std::invalid_argument("skip_threshold must be in [0, 1); hint: 0 turns skipping off");
    }
    release_direct_ = params.tier == "disk";
    if (layer_dev.size() != (size_t) n_layer) {
        throw std::logic_error("engine: one device per layer");
    }
    for (ggml_backend_dev_t dev : layer_dev) {
        layer_buft_.push_back(dev ? ggml_backend_dev_buffer_type(dev) : ggml_backend_cpu_buffer_type());
    }
    store_ = std::make_unique<expert_store>(path, n_layer, n_expert, params.direct_io, params.io_threads,
                                            params.tier == "host");
    if (params.tier == "disk" && params.stream) {
        stream_ = std::make_unique<expert_stream>(*store_, params.io_threads, k_stream_ring_bytes);
    }
    const multidim_weights mw{ params.w_recency, params.w_frequency, params.w_precision };
    uint64_t budget_hi = params.budget;
    if (!params.lo_path.empty()) {
        store_lo_ = std::make_unique<expert_store>(params.lo_path, n_layer, n_expert, params.direct_io,
                                                   params.io_threads, false);
        check_sidecar_layout(*store_, *store_lo_);
        const uint64_t budget_lo = (uint64_t) (params.lo_share * (double) params.budget);
        budget_hi -= budget_lo;
        cache_lo_ = std::make_unique<expert_cache>(store_lo_->layers(), n_expert, budget_lo, layer_buft_,
                                                   make_eviction_policy(params.policy, mw), params.profile, true,
                                                   params.per_layer);
    }
    cache_ = std::make_unique<expert_cache>(store_->layers(), n_expert, budget_hi, layer_buft_,
                                            make_eviction_policy(params.policy, mw), params.profile, true,
                                            params.per_layer);
    // admission weighs what was used over the last ~32 tokens
    cache_->set_half_life(32.0 * n_layer);
    for (int32_t il = 0; il < n_layer; ++il) {
        device_pools_ |= cache_->class_of(il) >= 0 && !cache_->cls(cache_->class_of(il)).host;
    }
    // an upload stream per device holding pools: the engine's own backend
    // instance of it (background uploads, and the calibration of link and device)
    std::vector<ggml_backend_buffer_type_t> seen;
    for (int32_t il = 0; il < n_layer && device_pools_; ++il) {
        ggml_backend_buffer_type_t buft = layer_buft_[il];
        if (!layer_dev[il] || std::find(seen.begin(), seen.end(), buft) != seen.end()) {
            continue;
        }
        seen.push_back(buft);
        ggml_backend_ptr backend(ggml_backend_dev_init(layer_dev[il], nullptr));
        if (!backend) {
            throw std::runtime_error(std::string("cannot start an upload stream on ") +
                                     ggml_backend_dev_name(layer_dev[il]));
        }
        upload_backends_.push_back(std::move(backend));
    }
    if (params.prefetch || (params.admission && device_pools_)) {
        loader_ = std::make_unique<async_loader>(std::max(1, params.io_threads / 2));
        for (const auto & b : upload_backends_) {
            loader_->add_upload_backend(ggml_backend_get_default_buffer_type(b.get()), b.get());
        }
    }
    if (params.prefetch) {
        prefetcher::targets t{ cache_.get(), store_.get(), cache_lo_.get(), store_lo_.get(),
                               cache_lo_ ? params.lo_threshold : 0.0f };
        prefetcher_ = std::make_unique<prefetcher>(n_layer, n_embd, n_expert_used, *loader_, pending_,
                                                   params.prefetch_depth, params.prefetch_max_tokens, t);
    }
    flops_per_token_.assign((size_t) n_layer, 0.0);
    for (const auto & l : store_->layers()) {
        if (l.il < 0) {
            continue;
        }
        first_moe_layer_ = first_moe_layer_ < 0 ? l.il : first_moe_layer_;
        for (const auto & p : l.projs) {
            flops_per_token_[(size_t) l.il] += 2.0 * (double) p.ne[0] * (double) p.ne[1];
        }
    }
    if (!params.record_path.empty() && first_moe_layer_ >= 0) {
        const record_header h{ path.substr(path.find_last_of("/\\") + 1), n_layer, n_expert, n_expert_used,
                               params.prefetch ? params.prefetch_depth : 0, store_->layer(first_moe_layer_)->expert_bytes,
                               (uint64_t) (flops_per_token_[(size_t) first_moe_layer_] / 2) };
        recorder_ = std::make_unique<routing_recorder>(params.record_path, h, prefetcher_.get());
    }
    expert_tensors_.assign((size_t) n_layer, {});
    hook_.reset(make_moe_hook(*this));

    // persistent id tensors: written by on_route, read by the layer's matmuls
    // (not graph inputs: the scheduler copies inputs before a split starts,
    // which is before the callback has written them). The pool branches' ids
    // live where the pools do, packed into one tensor per layer; the direct
    // branch's in host memory, where the CPU reads them.
    const int32_t n_branches = cache_lo_ ? 4 : 2;
    std::vector<ggml_backend_buffer_type_t> bufts;
    auto ctx_for = [&](ggml_backend_buffer_type_t buft) {
        const size_t i = (size_t) (std::find(bufts.begin(), bufts.end(), buft) - bufts.begin());
        if (i == bufts.size()) {
            bufts.push_back(buft);
            ggml_init_params ip = { ggml_tensor_overhead() * (3 * (size_t) n_layer + 1), nullptr, true };
            ids_ctx_.emplace_back(ggml_init(ip));
        }
        return ids_ctx_[i].get();
    };
    plan_tensors_.resize((size_t) n_layer);
    for (int32_t il = 0; il < n_layer; ++il) {
        if (!store_->layer(il)) {
            continue;
        }
        layer_plan_tensors & pt = plan_tensors_[il];
        pt.n_branches           = n_branches;
        // [n_used * n_branches, n_tokens_max]
        pt.ids_dev = ggml_new_tensor_2d(ctx_for(layer_buft_[il]), GGML_TYPE_I32, (int64_t) n_expert_used * n_branches,
                                        n_tokens_max);
        // [n_used, n_tokens_max]
        pt.ids_direct = ggml_new_tensor_2d(ctx_for(ggml_backend_cpu_buffer_type()), GGML_TYPE_I32, n_expert_used,
                                           n_tokens_max);
        ggml_format_name(pt.ids_dev, "pymoe_ids_pool-%d", il);
        ggml_format_name(pt.ids_direct, "pymoe_ids_direct-%d", il);
        if (params.skip_threshold > 0.0f && params.skip_renormalize) {
            // [n_used, n_tokens_max] per pair: the token's top-k sum over what its kept pairs weigh
            pt.skip_scale = ggml_new_tensor_2d(ctx_for(layer_buft_[il]), GGML_TYPE_F32, n_expert_used, n_tokens_max);
            ggml_format_name(pt.skip_scale, "pymoe_skip_scale-%d", il);
        }
        for (ggml_tensor * t : { pt.ids_dev, pt.ids_direct }) {
            t->flags |= GGML_TENSOR_FLAG_SKIP_IDS;  // -1 skips a pair: backends take their skip-aware path
        }
    }
    for (size_t i = 0; i < bufts.size(); ++i) {
        ids_buf_.emplace_back(ggml_backend_alloc_ctx_tensors_from_buft(ids_ctx_[i].get(), bufts[i]));
        if (!ids_buf_.back()) {
            throw std::runtime_error(std::string("cannot allocate the expert plan tensors in ") +
                                     ggml_backend_buft_name(bufts[i]));
        }
        ggml_backend_buffer_clear(ids_buf_.back().get(), 0xFF);  // -1 everywhere until a plan is written
    }

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
}

engine::~engine() {
    recorder_.reset();  // reads the prefetcher's last guesses
    prefetcher_.reset();
    loader_.reset();  // finishes its upload and joins before the pools and upload streams go
    release_direct();
}

void engine::start() {
    started_ = true;
    const cost_model measured = calibrate();  // pymoe-calibrate.cpp
    {
        std::lock_guard<std::mutex> lock(stats_mutex_);  // stats() reports it
        cost_ = measured;
    }
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
        try {
            store_->read_experts(jobs);
        } catch (...) {
            for (const auto & j : jobs) {  // nothing usable in them: not a hot set
                cache_->release(j.il, j.e);
            }
            throw;
        }
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
        // set once: every later graph sees the same tensors, and the background
        // loader may be reading this very field (a rewrite would race with it)
        if (p.host != v.expert_data[p.kind]) {
            store_->set_host(v.il, p.kind, v.expert_data[p.kind]);
        }
        expert_tensors_[(size_t) v.il][p.kind] = v.expert_tensors[p.kind];
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

void engine::write_plan(int32_t il, int64_t n_pairs) {
    // one write per tensor: the graph reads contiguous prefix views of both
    const layer_plan_tensors & pt     = plan_tensors_[il];
    const int64_t              n_used = pt.ids_direct->ne[0];
    const int64_t              n_tok  = n_pairs / n_used;
    const int32_t *            src[PLAN_DEV_COUNT] = { ids_pool_.data(), ids_pool_b_.data(), ids_lo_.data(),
                                                       ids_lo_b_.data() };
    packed_.resize((size_t) (n_pairs * pt.n_branches));
    for (int64_t t = 0; t < n_tok; ++t) {
        for (int32_t b = 0; b < pt.n_branches; ++b) {
            std::memcpy(packed_.data() + (t * pt.n_branches + b) * n_used, src[b] + t * n_used,
                        (size_t) n_used * sizeof(int32_t));
        }
    }
    ggml_backend_tensor_set(pt.ids_dev, packed_.data(), 0, packed_.size() * sizeof(int32_t));
    ggml_backend_tensor_set(pt.ids_direct, ids_direct_.data(), 0, (size_t) n_pairs * sizeof(int32_t));
    if (pt.skip_scale) {
        ggml_backend_tensor_set(pt.skip_scale, skip_scale_.data(), 0, (size_t) n_pairs * sizeof(float));
    }
}

void engine::stream_layer(int32_t il, int64_t n_tokens) {
    // a batch a device offloads (op_offload) computes the direct branch there, from the mapping
    if (!stream_ || (cost_.offload_min_batch > 0 && n_tokens >= cost_.offload_min_batch)) {
        return;
    }
    direct_experts_.clear();
    for (int32_t e : ids_direct_) {
        if (e >= 0) {
            direct_experts_.push_back(e);
        }
    }
    stream_->begin_layer(il, direct_experts_);
}

void engine::finish_stream() {
    if (!stream_) {
        return;
    }
    const expert_stream::layer_result r = stream_->end_layer();
    if (r.il >= 0) {
        std::lock_guard<std::mutex> lock(stats_mutex_);
        layer_stats_[r.il].bytes_streamed += r.bytes;
        layer_stats_[r.il].stream_wait_seconds += r.wait_seconds;
        layer_stats_[r.il].stream_fallbacks += r.fallbacks;
    }
}

void engine::release_direct() {
    finish_stream();
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
    if (il == first_moe_layer_) {
        // a decode token's time (first MoE layer to first MoE layer): how far
        // background admission may run ahead of the compute
        if (n_tokens <= params_.prefetch_max_tokens && last_first_step_ != clock_type::time_point{}) {
            const double                dt = seconds_since(last_first_step_);
            std::lock_guard<std::mutex> lock(stats_mutex_);  // stats() reports it
            token_seconds_ = token_seconds_ > 0 ? 0.8 * token_seconds_ + 0.2 * dt : dt;
        }
        last_first_step_ = n_tokens <= params_.prefetch_max_tokens ? t0 : clock_type::time_point{};
    }

    layer_stats ls;
    double      load_seconds = 0.0;
    try {
        read_ids(rt.selected, sel_);
        if ((cache_lo_ || recorder_ || params_.skip_threshold > 0.0f) && params_.replay_weights.empty()) {
            const auto tw = clock_type::now();
            read_weights(rt.weights, w_);  // mixed precision and skipping weigh each pair
            if (!cache_lo_ && params_.skip_threshold <= 0.0f) {
                ls.record_seconds += seconds_since(tw);  // read for the recorder only
            }
        } else {
            // nothing else needs them (the planner only breaks ties with them):
            // one read fewer at every sync point (a round trip on an RPC device)
            w_.assign((size_t) n_pairs, 1.0f);
        }
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
        if (recorder_) {
            const auto tr = clock_type::now();
            recorder_->route(il, n_tokens, n_used, sel_.data(), w_.data());
            ls.record_seconds += seconds_since(tr);
        }
        relative_gate_weights(w_.data(), n_tokens, n_used);
        plan_step(il, n_used, n_tokens, step, ls, load_seconds);
        if (prefetcher_ && rt.input && n_tokens <= params_.prefetch_max_tokens) {
            read_input(rt.input, x_);
            prefetcher_->after_plan(il, x_.data(), n_tokens, step);
        }
        if (loader_) {
            const std::string e = loader_->take_error();
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
        skip_scale_.assign((size_t) n_pairs, 1.0f);
        for (size_t p = 0; p < ids_direct_.size() && p < sel_.size(); ++p) {
            if (sel_[p] >= 0 && sel_[p] < n_expert_) {
                ids_direct_[p] = sel_[p];
            }
        }
        ls              = layer_stats{};
        ls.direct_pairs = (uint64_t) n_pairs;
    }
    write_plan(il, n_pairs);
    stream_layer(il, n_tokens);

    ls.steps        = 1;
    ls.pairs        = (uint64_t) n_pairs;
    ls.load_seconds = load_seconds;
    ls.plan_seconds = seconds_since(t0) - load_seconds - ls.prefetch_wait_seconds - ls.record_seconds;
    std::lock_guard<std::mutex> lock(stats_mutex_);
    layer_stats_[il] += ls;
}

bool engine::admission_active(int64_t n_tokens) const {
    // decode with slots on a device; a prefill ubatch loads in the foreground when that wins
    return loader_ && params_.admission && params_.cpu_assist && device_pools_ &&
           n_tokens <= params_.prefetch_max_tokens;
}

uint64_t engine::admission_budget(int64_t n_tokens) const {
    // background admission fills device slots while the link is idle: at most
    // what the link moves in one token's time may be queued
    if (!admission_active(n_tokens)) {
        return 0;
    }
    const double   horizon = token_seconds_ > 0 ? token_seconds_ : 0.05;
    const uint64_t ahead   = cost_.read_bw > 0 ? (uint64_t) (horizon * cost_.read_bw) : UINT64_MAX;
    const uint64_t queued  = loader_->pending_bytes();
    return ahead > queued ? ahead - queued : 0;
}

void engine::plan_step(int32_t il, int64_t n_used, int64_t n_tokens, uint64_t step, layer_stats & ls,
                       double & load_seconds) {
    const int64_t        n_pairs = n_used * n_tokens;
    const expert_layer & layer   = *store_->layer(il);

    if (loader_) {
        pending_.settle();  // background loads that completed are hits from now on
    }
    if (prefetcher_) {
        // what the predictions made for this layer got right; their loads must have landed
        chosen_.clear();
        for (int64_t p = 0; p < n_pairs; ++p) {
            if (sel_[p] >= 0 && sel_[p] < n_expert_ && std::find(chosen_.begin(), chosen_.end(), sel_[p]) == chosen_.end()) {
                chosen_.push_back(sel_[p]);
            }
        }
        prefetcher_->before_plan(il, chosen_, ls);
    }

    step_config cfg;
    cfg.admit           = cache_->policy().admits_on_miss();
    cfg.assist          = params_.cpu_assist;
    cfg.lo_threshold    = cache_lo_ ? params_.lo_threshold : 0.0f;
    cfg.skip_threshold  = params_.skip_threshold;
    cfg.expert_bytes    = layer.expert_bytes;
    cfg.expert_bytes_lo = cache_lo_ ? store_lo_->layer(il)->expert_bytes : 0;
    cfg.flops_per_token = flops_per_token_[(size_t) il];
    cfg.cost            = cost_;
    // with background admission a miss is served where it is cheapest now:
    // filling the cache for later steps happens off the critical path
    cfg.cost.reuse      = admission_active(n_tokens) ? 1.0 : reuse_.estimate();
    cfg.admit_bytes     = admission_budget(n_tokens);
    std::unique_lock<std::mutex> cache_lock(cache_mutex_);  // stats() reads the cache's counters
    const step_plan & plan =
        planner_.plan(il, sel_.data(), w_.data(), n_tokens, n_used, *cache_, cache_lo_.get(), step, cfg);
    cache_lock.unlock();

    std::vector<expert_store::read_job> jobs, jobs_lo;
    uint64_t                            step_hits = 0, step_loads = 0;
    for (size_t i = 0; i < plan.experts.size(); ++i) {
        const int32_t e = plan.experts[i].expert;
        switch (plan.actions[i]) {
            case ACTION_HIT:
                ++ls.hits;
                break;
            case ACTION_HIT_LO:
                ++ls.hits_lo;
                break;
            case ACTION_LOAD:
                jobs.push_back({ il, e, cache_->slot_dst(cache_->class_of(il), plan.slots[i], layer) });
                ++ls.loads;
                ls.bytes_loaded += layer.expert_bytes;
                break;
            case ACTION_LOAD_LO:
                {
                    const expert_layer & lo = *store_lo_->layer(il);
                    jobs_lo.push_back({ il, e, cache_lo_->slot_dst(cache_lo_->class_of(il), plan.slots[i], lo) });
                    ++ls.loads_lo;
                    ls.bytes_loaded_lo += lo.expert_bytes;
                }
                break;
            case ACTION_SKIP:
                ++ls.skipped;
                break;
            default:
                ++ls.direct;
                ls.bytes_direct += layer.expert_bytes;
                if (release_direct_ && !stream_) {
                    store_->advise_willneed(il, e);  // the stream reads it otherwise
                }
                pending_release_.emplace_back(il, e);
                break;
        }
        const bool hit = plan.actions[i] == ACTION_HIT || plan.actions[i] == ACTION_HIT_LO;
        ls.misses += !hit;
        step_hits += hit;
        step_loads += plan.actions[i] == ACTION_LOAD || plan.actions[i] == ACTION_LOAD_LO;
    }
    ls.evictions += plan.evictions;
    ls.upgrades += plan.upgrades;
    reuse_.observe(step_hits, step_loads);

    if (!jobs.empty() || !jobs_lo.empty()) {
        const auto t1 = clock_type::now();
        try {
            store_->read_experts(jobs);
            if (!jobs_lo.empty()) {
                store_lo_->read_experts(jobs_lo);
            }
        } catch (...) {
            // the slots hold nothing usable: free them, or a later step would
            // count them as hits and compute from whatever is in them
            for (const auto & j : jobs) {
                cache_->release(j.il, j.e);
            }
            for (const auto & j : jobs_lo) {
                cache_lo_->release(j.il, j.e);
            }
            throw;
        }
        load_seconds = seconds_since(t1);
    }

    // background admission: uploads that become hits once they have landed
    for (size_t k = 0; k < plan.admitted.size(); ++k) {
        const int32_t e    = plan.experts[(size_t) plan.admitted[k]].expert;
        auto          done = loader_->submit(
            *store_, { il, e, cache_->slot_dst(cache_->class_of(il), plan.admitted_slots[k], layer) },
            layer.expert_bytes);
        pending_.add(*cache_, il, e, std::move(done));
        ++ls.admissions;
        ls.bytes_admitted += layer.expert_bytes;
    }

    ids_pool_.resize((size_t) n_pairs);
    ids_pool_b_.resize((size_t) n_pairs);
    ids_lo_.resize((size_t) n_pairs);
    ids_lo_b_.resize((size_t) n_pairs);
    ids_direct_.resize((size_t) n_pairs);
    for (int64_t p = 0; p < n_pairs; ++p) {
        const int32_t       e  = sel_[p];
        const expert_action a  = planner_.action_of(e);
        const bool          hi = a == ACTION_HIT || a == ACTION_LOAD;
        const bool          lo = a == ACTION_HIT_LO || a == ACTION_LOAD_LO;
        const bool          skip = a == ACTION_SKIP;  // -1 in every branch: the pair's output row is zero
        ids_pool_[p]           = hi ? planner_.slot_of(e) : -1;
        ids_pool_b_[p]         = hi ? e : -1;
        ids_lo_[p]             = lo ? planner_.slot_of(e) : -1;
        ids_lo_b_[p]           = lo ? e : -1;
        ids_direct_[p]         = hi || lo || skip ? -1 : e;
        ls.pool_pairs += hi;
        ls.lo_pairs += lo;
        ls.direct_pairs += !hi && !lo && !skip;
        ls.skipped_pairs += skip;
    }
    if (plan_tensors_[il].skip_scale) {
        // renormalised: each kept pair's weight times (top-k sum / kept sum) of its token; w_ is relative (sums to 1)
        skip_scale_.resize((size_t) n_pairs);
        for (int64_t t = 0; t < n_tokens; ++t) {
            float kept = 0.0f;
            for (int64_t i = 0; i < n_used; ++i) {
                kept += ids_direct_[t * n_used + i] >= 0 || ids_pool_[t * n_used + i] >= 0 || ids_lo_[t * n_used + i] >= 0
                            ? w_[t * n_used + i] : 0.0f;
            }
            for (int64_t i = 0; i < n_used; ++i) {
                skip_scale_[t * n_used + i] = kept > 0.0f ? 1.0f / kept : 0.0f;
            }
        }
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
    {
        std::lock_guard<std::mutex> lock(stats_mutex_);  // written at the sync points
        s.read_bandwidth    = cost_.read_bw;
        s.direct_bandwidth  = cost_.direct_bw;
        s.cpu_flops         = cost_.slow_flops;
        s.device_flops      = cost_.fast_flops;
        s.offload_min_batch = cost_.offload_min_batch;
        s.token_seconds     = token_seconds_;
    }
    for (const auto & b : ids_buf_) {
        s.ids_bytes += ggml_backend_buffer_get_size(b.get());
    }
    // one 8 MiB read (plus alignment slack) per io thread: the stores', and the background loader's;
    // and the stream's ring
    const int io = params_.io_threads * (store_lo_ ? 2 : 1) + (loader_ ? std::max(1, params_.io_threads / 2) : 0);
    s.bounce_bytes      = (uint64_t) io * ((8ull << 20) + 8192) + (stream_ ? stream_->memory_bytes() : 0);
    s.router_copy_bytes = prefetcher_ ? prefetcher_->predictor().copied_bytes() : 0;
    for (size_t i = 0; i < layer_buft_.size(); ++i) {
        const std::string name = ggml_backend_buft_name(layer_buft_[i]);
        if (store_->layer((int32_t) i) && std::find_if(s.pools_by_buffer.begin(), s.pools_by_buffer.end(), [&](const auto & x) {
                return x.first == name;
            }) == s.pools_by_buffer.end()) {
            s.pools_by_buffer.emplace_back(name, cache_->allocated_bytes(layer_buft_[i]) +
                                                     (cache_lo_ ? cache_lo_->allocated_bytes(layer_buft_[i]) : 0));
        }
    }
    s.pool_bytes_lo  = cache_lo_ ? cache_lo_->allocated_bytes() : 0;
    s.n_slots_lo     = cache_lo_ ? cache_lo_->n_slots() : 0;
    s.lo_threshold   = cache_lo_ ? params_.lo_threshold : 0.0f;
    s.prefetch       = prefetcher_ != nullptr;
    s.prefetch_busy_seconds = loader_ ? loader_->busy_seconds() : 0.0;
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
    std::lock_guard<std::mutex> cache_lock(cache_mutex_);
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
    const gguf_moe_counts counts   = gguf_read_moe_counts(gguf_read_info(path, 0));
    const int64_t         n_layer  = counts.n_layer;
    const int64_t         n_expert = counts.n_expert;
    if (n_expert <= 0) {
        throw std::invalid_argument("'" + path + "' has no routed experts; hint: offloading is for MoE models");
    }
    expert_store store(path, (int32_t) n_layer, (int32_t) n_expert, false, 1);
    expert_cache cache(store.layers(), (int32_t) n_expert, budget, { ggml_backend_cpu_buffer_type() },
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

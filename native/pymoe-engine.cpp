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

}  // namespace

engine::engine(const std::string & path, const offload_params & params, int32_t n_layer, int32_t n_expert,
               int32_t n_expert_used, int32_t n_tokens_max, ggml_backend_buffer_type_t buft_fast)
    : params_(params),
      n_layer_(n_layer),
      n_expert_(n_expert),
      n_expert_used_(n_expert_used),
      n_tokens_max_(n_tokens_max) {
    if (n_expert <= 0 || n_expert_used <= 0) {
        throw std::invalid_argument("'" + path +
                                    "' has no routed experts; hint: offloading is for MoE models, turn it off");
    }
    if (params.tier != "disk" && params.tier != "host") {
        throw std::invalid_argument("unknown offload tier '" + params.tier + "'; hint: use disk or host");
    }
    release_direct_ = params.tier == "disk";
    store_ = std::make_unique<expert_store>(path, n_layer, n_expert, params.direct_io, params.io_threads,
                                            params.tier == "host");
    cache_ = std::make_unique<expert_cache>(*store_, params.budget, buft_fast, make_eviction_policy(params.policy),
                                            params.profile);
    hook_.reset(make_moe_hook(*this));

    // persistent id tensors: written by on_route, read by the layer's matmuls
    // (not graph inputs: the scheduler copies inputs before a split starts,
    // which is before the callback has written them)
    const size_t     n_tensors = (size_t) n_layer * 3;
    ggml_init_params ip        = { ggml_tensor_overhead() * (n_tensors + 1), nullptr, true };
    ids_ctx_.reset(ggml_init(ip));
    plan_tensors_.resize((size_t) n_layer);
    for (int32_t il = 0; il < n_layer; ++il) {
        if (!store_->layer(il)) {
            continue;
        }
        auto make = [&](const char * what) {
            ggml_tensor * t = ggml_new_tensor_2d(ids_ctx_.get(), GGML_TYPE_I32, n_expert_used, n_tokens_max);
            ggml_format_name(t, "pymoe_%s-%d", what, il);
            t->flags |= GGML_TENSOR_FLAG_SKIP_IDS;  // -1 skips a pair: backends take their skip-aware path
            return t;
        };
        plan_tensors_[il] = { make("ids_pool"), make("ids_pool_b"), make("ids_direct") };
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
                                        std::to_string(n_expert_used) + "]; hint: fit it to the model's layers and top-k");
        }
        for (int32_t e : params.replay) {
            if (e < 0 || e >= n_expert) {
                throw std::invalid_argument("the replay trace names expert " + std::to_string(e) + " of a model with " +
                                            std::to_string(n_expert));
            }
        }
        replay_cursor_.assign((size_t) n_layer, 0);
    }
    route_selected_.assign((size_t) n_layer, nullptr);
    route_weights_.assign((size_t) n_layer, nullptr);
    layer_stats_.assign((size_t) n_layer, layer_stats{});
    count_.assign((size_t) n_expert, 0);
    wsum_.assign((size_t) n_expert, 0.0f);
    action_of_.assign((size_t) n_expert, -1);
    slot_of_.assign((size_t) n_expert, -1);

}

void engine::start() {
    started_ = true;
    // the cost model, measured: a disk-tier load reads the file, and so does the
    // direct branch (through the mapping); a host-tier load copies in memory and
    // the direct branch reads the weights in place; both compute on the CPU
    cost_.read_bw   = store_->measure_read_bandwidth(std::min<uint64_t>(64ull << 20, store_->total_expert_bytes()));
    cost_.direct_bw = release_direct_ ? cost_.read_bw : 0.0;

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

engine::~engine() {
    release_direct();
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

void engine::note_layer_built(int32_t il, ggml_tensor * selected, ggml_tensor * weights) {
    route_selected_[il] = selected;
    route_weights_[il]  = weights;
    ggml_format_name(weights, "%s%d", k_route_prefix, il);
}

void engine::read_ids(const ggml_tensor * t, std::vector<int32_t> & out) const {
    // [n_used, n_tokens], possibly a strided view (top-k of an argsort)
    const int64_t n0 = t->ne[0], n1 = t->ne[1];
    out.resize((size_t) (n0 * n1));
    const bool host = t->buffer == nullptr || ggml_backend_buffer_is_host(t->buffer);
    std::vector<uint8_t> tmp;
    const uint8_t *      base = static_cast<const uint8_t *>(t->data);
    if (!host) {
        tmp.resize((size_t) (t->nb[1] * (n1 - 1) + t->nb[0] * n0));
        ggml_backend_tensor_get(t, tmp.data(), 0, tmp.size());
        base = tmp.data();
    }
    for (int64_t j = 0; j < n1; ++j) {
        for (int64_t i = 0; i < n0; ++i) {
            out[(size_t) (j * n0 + i)] = *reinterpret_cast<const int32_t *>(base + j * t->nb[1] + i * t->nb[0]);
        }
    }
}

void engine::read_weights(const ggml_tensor * t, std::vector<float> & out) const {
    // [1, n_used, n_tokens] (or [n_used, n_tokens])
    const int64_t n0 = t->ne[0] * t->ne[1], n1 = t->ne[2];
    out.resize((size_t) (n0 * n1));
    const bool           host = t->buffer == nullptr || ggml_backend_buffer_is_host(t->buffer);
    std::vector<uint8_t> tmp;
    const uint8_t *      base = static_cast<const uint8_t *>(t->data);
    if (!host) {
        tmp.resize(ggml_nbytes(t));
        ggml_backend_tensor_get(t, tmp.data(), 0, tmp.size());
        base = tmp.data();
    }
    for (int64_t j = 0; j < n1; ++j) {
        for (int64_t i = 0; i < t->ne[1]; ++i) {
            out[(size_t) (j * t->ne[1] + i)] =
                *reinterpret_cast<const float *>(base + j * t->nb[2] + i * t->nb[1]);
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

    const expert_layer * layer = store_->layer(il);
    ggml_tensor *        sel_t = route_selected_[il];
    ggml_tensor *        w_t   = route_weights_[il];
    if (!layer || !sel_t || !w_t) {
        return;
    }
    const int64_t n_used   = sel_t->ne[0];
    const int64_t n_tokens = sel_t->ne[1];
    const int64_t n_pairs  = n_used * n_tokens;
    const uint64_t step    = ++step_;

    layer_stats ls;
    double      load_seconds = 0.0;
    try {
        read_ids(sel_t, sel_);
        read_weights(w_t, w_);
        if (!replay_cursor_.empty()) {
            // benchmark mode: the trace's experts replace the router's choice
            const uint64_t rows = params_.replay.size() / ((size_t) n_layer_ * (size_t) n_used);
            for (int64_t t = 0; t < n_tokens; ++t) {
                const uint64_t row = (replay_cursor_[il] + (uint64_t) t) % rows;
                for (int64_t i = 0; i < n_used; ++i) {
                    sel_[(size_t) (t * n_used + i)] =
                        params_.replay[(row * (uint64_t) n_layer_ + (uint64_t) il) * (uint64_t) n_used + (uint64_t) i];
                }
            }
            replay_cursor_[il] += (uint64_t) n_tokens;
        }

        // the distinct experts of this step
        std::vector<planned_expert> experts;
        for (int64_t p = 0; p < n_pairs; ++p) {
            const int32_t e = sel_[p];
            if (e < 0 || e >= n_expert_) {
                throw std::runtime_error("router chose expert " + std::to_string(e) + " in layer " +
                                         std::to_string(il));
            }
            if (count_[e]++ == 0) {
                experts.push_back({ e, 0, 0.0f, false });
            }
            wsum_[e] += p < (int64_t) w_.size() ? w_[p] : 0.0f;
        }
        const int32_t c       = cache_->class_of(il);
        const int32_t n_slots = c >= 0 ? cache_->cls(c).n_slots : 0;
        int32_t       n_hits  = 0;
        for (auto & x : experts) {
            x.n_tokens = count_[x.expert];
            x.weight   = wsum_[x.expert];
            x.cached   = cache_->lookup(il, x.expert) >= 0;
            n_hits += x.cached;
            cache_->count(il, x.expert, (uint64_t) x.n_tokens);
        }

        plan_request req;
        req.experts         = experts;
        req.capacity        = n_slots - n_hits;
        req.admit           = cache_->policy().admits_on_miss();
        req.assist          = params_.cpu_assist;
        req.expert_bytes    = layer->expert_bytes;
        req.flops_per_token = 0;
        req.cost            = cost_;
        const std::vector<expert_action> actions = plan_layer(req);

        // pin the hits first: a load must not evict an expert this step uses
        for (size_t i = 0; i < experts.size(); ++i) {
            if (actions[i] == ACTION_HIT) {
                cache_->touch(il, experts[i].expert, step);
            }
        }
        std::vector<expert_store::read_job> jobs;
        for (size_t i = 0; i < experts.size(); ++i) {
            const int32_t e = experts[i].expert;
            expert_action a = actions[i];
            int32_t       slot = -1;
            if (a == ACTION_HIT) {
                slot = cache_->lookup(il, e);
                ++ls.hits;
            } else {
                ++ls.misses;
                if (a == ACTION_LOAD) {
                    bool evicted = false;
                    slot         = cache_->assign(il, e, step, &evicted);
                    if (slot >= 0) {
                        jobs.push_back({ il, e, cache_->slot_dst(c, slot, *layer) });
                        ++ls.loads;
                        ls.evictions += evicted;
                        ls.bytes_loaded += layer->expert_bytes;
                    } else {
                        a = ACTION_DIRECT;
                    }
                }
                if (a == ACTION_DIRECT) {
                    ++ls.direct;
                    ls.bytes_direct += layer->expert_bytes;
                    if (release_direct_) {
                        store_->advise_willneed(il, e);
                    }
                    pending_release_.emplace_back(il, e);
                }
            }
            action_of_[e] = a;
            slot_of_[e]   = slot;
        }

        if (!jobs.empty()) {
            const auto t1 = clock_type::now();
            store_->read_experts(jobs);
            load_seconds = seconds_since(t1);
        }

        ids_pool_.resize((size_t) n_pairs);
        ids_pool_b_.resize((size_t) n_pairs);
        ids_direct_.resize((size_t) n_pairs);
        for (int64_t p = 0; p < n_pairs; ++p) {
            const int32_t e      = sel_[p];
            const bool    direct = action_of_[e] == ACTION_DIRECT;
            ids_pool_[p]         = direct ? -1 : slot_of_[e];
            ids_pool_b_[p]       = direct ? -1 : e;
            ids_direct_[p]       = direct ? e : -1;
            ls.pool_pairs += !direct;
            ls.direct_pairs += direct;
        }
    } catch (const std::exception & ex) {
        // never throw through ggml: serve every pair from the model's tensors
        // (always correct) and report the failure after the decode
        if (error_.empty()) {
            error_ = "expert offload, layer " + std::to_string(il) + ": " + ex.what();
        }
        ids_pool_.assign((size_t) n_pairs, -1);
        ids_pool_b_.assign((size_t) n_pairs, -1);
        ids_direct_.assign(sel_.begin(), sel_.begin() + std::min<size_t>(sel_.size(), (size_t) n_pairs));
        ids_direct_.resize((size_t) n_pairs, 0);
        ls = layer_stats{};
        ls.direct_pairs = (uint64_t) n_pairs;
    }
    const layer_plan_tensors & pt = plan_tensors_[il];
    write_ids(pt.ids_pool, ids_pool_, n_pairs);
    write_ids(pt.ids_pool_b, ids_pool_b_, n_pairs);
    write_ids(pt.ids_direct, ids_direct_, n_pairs);

    // reset the per-step scratch
    for (int64_t p = 0; p < n_pairs && p < (int64_t) sel_.size(); ++p) {
        const int32_t e = sel_[p];
        if (e >= 0 && e < n_expert_) {
            count_[e]     = 0;
            wsum_[e]      = 0.0f;
            action_of_[e] = -1;
            slot_of_[e]   = -1;
        }
    }

    ls.steps        = 1;
    ls.pairs        = (uint64_t) n_pairs;
    ls.load_seconds = load_seconds;
    ls.plan_seconds = seconds_since(t0) - load_seconds;
    std::lock_guard<std::mutex> lock(stats_mutex_);
    layer_stats & acc = layer_stats_[il];
    acc.steps += ls.steps;
    acc.pairs += ls.pairs;
    acc.hits += ls.hits;
    acc.misses += ls.misses;
    acc.loads += ls.loads;
    acc.direct += ls.direct;
    acc.evictions += ls.evictions;
    acc.pool_pairs += ls.pool_pairs;
    acc.direct_pairs += ls.direct_pairs;
    acc.bytes_loaded += ls.bytes_loaded;
    acc.bytes_direct += ls.bytes_direct;
    acc.load_seconds += ls.load_seconds;
    acc.plan_seconds += ls.plan_seconds;
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
    {
        std::lock_guard<std::mutex> lock(stats_mutex_);
        s.layers = layer_stats_;
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
}

}  // namespace pymoe

namespace pymoe {

std::vector<pool_plan> offload_plan(const std::string & path, uint64_t budget, uint64_t * planned_bytes) {
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
    expert_cache cache(store, budget, ggml_backend_cpu_buffer_type(), make_eviction_policy("lru"), {}, false);
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

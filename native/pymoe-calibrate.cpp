// The engine's cost model, measured on this machine at the first sync point
// (engine::calibrate): how fast slots fill, and how fast the CPU and the device
// run a real expert matmul of the model's own type.
#include "pymoe-engine.h"

#include "ggml-alloc.h"
#include "ggml-backend.h"
#include "ggml-cpu.h"
#include "ggml.h"

#include <algorithm>
#include <stdexcept>
#include <vector>

namespace pymoe {

namespace {

// Seconds of one mul_mat_id of `n_tokens` tokens over expert weights `w`
// [n_in, n_out, n] (any buffer `backend` can read), one expert per token,
// cycling over the first `n_ids` experts: the median of `reps` runs.
double time_mul_mat_id(ggml_backend_t backend, ggml_tensor * w, int64_t n_tokens, int32_t n_ids, int reps) {
    ggml_init_params ip = { ggml_tensor_overhead() * 8 + ggml_graph_overhead(), nullptr, true };
    ggml_context_ptr ctx(ggml_init(ip));
    ggml_tensor *    x   = ggml_new_tensor_3d(ctx.get(), GGML_TYPE_F32, w->ne[0], 1, n_tokens);  // [n_in, 1, n_tokens]
    ggml_tensor *    ids = ggml_new_tensor_2d(ctx.get(), GGML_TYPE_I32, 1, n_tokens);            // [1, n_tokens]
    ggml_tensor *    out = ggml_mul_mat_id(ctx.get(), w, x, ids);                                 // [n_out, 1, n_tokens]
    ggml_cgraph *    gf  = ggml_new_graph(ctx.get());
    ggml_build_forward_expand(gf, out);
    ggml_backend_buffer_ptr buf(ggml_backend_alloc_ctx_tensors(ctx.get(), backend));
    if (!buf) {
        throw std::runtime_error("calibration: cannot allocate its inputs");
    }
    std::vector<float> xv((size_t) ggml_nelements(x), 0.01f);
    ggml_backend_tensor_set(x, xv.data(), 0, ggml_nbytes(x));
    std::vector<double> times;
    for (int r = 0; r <= reps; ++r) {
        std::vector<int32_t> iv((size_t) n_tokens);
        for (int64_t t = 0; t < n_tokens; ++t) {
            iv[(size_t) t] = (int32_t) ((r * n_tokens + t) % std::max(1, n_ids));
        }
        ggml_backend_tensor_set(ids, iv.data(), 0, ggml_nbytes(ids));
        ggml_backend_synchronize(backend);
        const auto t0 = clock_type::now();
        if (ggml_backend_graph_compute(backend, gf) != GGML_STATUS_SUCCESS) {
            throw std::runtime_error(std::string("calibration: ") + ggml_backend_name(backend) +
                                     " cannot run the expert matmul");
        }
        ggml_backend_synchronize(backend);
        if (r > 0) {  // the first run warms up
            times.push_back(std::chrono::duration<double>(clock_type::now() - t0).count());
        }
    }
    std::sort(times.begin(), times.end());
    return times[times.size() / 2];
}

// bytes/s of uploads from host memory into device memory on `backend`, as
// background loads do them (8 MiB pieces, asynchronously, then a sync)
double time_uploads(ggml_backend_t backend, ggml_tensor * dst, const uint8_t * src, uint64_t src_bytes) {
    const uint64_t chunk = std::min<uint64_t>(8ull << 20, std::min<uint64_t>(src_bytes, ggml_nbytes(dst)));
    const uint64_t total = std::max<uint64_t>(chunk, std::min<uint64_t>(64ull << 20, 16 * chunk));
    ggml_backend_tensor_set(dst, src, 0, chunk);  // warm up (allocations, first touch)
    ggml_backend_synchronize(backend);
    const auto t0 = clock_type::now();
    for (uint64_t done = 0; done < total; done += chunk) {
        ggml_backend_tensor_set_async(backend, dst, src, 0, chunk);
    }
    ggml_backend_synchronize(backend);
    const double secs = std::chrono::duration<double>(clock_type::now() - t0).count();
    return secs > 0 ? (double) total / secs : 0.0;
}

}  // namespace

cost_model engine::calibrate() const {
    cost_model c;
    // a disk-tier load reads the file, and so does the direct branch (through
    // the mapping): the disk decides both, whatever computes
    c.read_bw   = store_->measure_read_bandwidth(std::min<uint64_t>(64ull << 20, store_->total_expert_bytes()));
    c.direct_bw = release_direct_ ? c.read_bw : 0.0;
    if (release_direct_ || !device_pools_) {
        // pools in host memory (a CPU-only host tier): a copy never beats computing in place
        return c;
    }

    // slots on a device, experts resident in host memory (the GPU deployment):
    // measure the link, the CPU and the device on the first MoE layer with device pools
    int32_t il = -1;
    for (int32_t l = 0; l < n_layer_ && il < 0; ++l) {
        const int32_t c = cache_->class_of(l);
        if (c >= 0 && !cache_->cls(c).host && cache_->cls(c).n_slots > 0 && store_->layer(l)) {
            il = l;
        }
    }
    if (il < 0 || upload_backends_.empty()) {
        return c;
    }
    const expert_layer & layer = *store_->layer(il);
    const expert_proj *  big   = &layer.projs[0];
    for (const auto & p : layer.projs) {
        big = p.expert_bytes > big->expert_bytes ? &p : big;
    }
    const pool_class & pc       = cache_->cls(cache_->class_of(il));
    ggml_tensor *      pool_w   = pc.tensors[big->kind];
    ggml_tensor *      model_w  = expert_tensors_[(size_t) il][big->kind];
    ggml_backend_t     upload   = nullptr;
    for (const auto & b : upload_backends_) {
        if (ggml_backend_get_default_buffer_type(b.get()) == pc.buft) {
            upload = b.get();
        }
    }
    if (!upload || !model_w || !big->host) {
        return c;
    }
    const double scale = (double) layer.expert_bytes / (double) big->expert_bytes;  // one projection -> the expert

    c.read_bw = time_uploads(upload, pool_w, big->host, big->expert_bytes * (uint64_t) n_expert_);

    // the CPU, where the experts live: one token (memory-bound: its bytes/s) and
    // a batch of 32 (compute-bound: its FLOP/s)
    ggml_backend_ptr cpu(ggml_backend_cpu_init());
    ggml_backend_cpu_set_n_threads(cpu.get(), n_threads_);
    const double t_cpu1  = time_mul_mat_id(cpu.get(), model_w, 1, n_expert_, 3) * scale;
    const double t_cpu32 = time_mul_mat_id(cpu.get(), model_w, 32, n_expert_, 2) * scale;
    c.direct_bw      = t_cpu1 > 0 ? (double) layer.expert_bytes / t_cpu1 : 0.0;
    c.slow_flops     = t_cpu32 > 0 ? 32.0 * flops_per_token_[(size_t) il] / t_cpu32 : 0.0;
    // the device, on its own slots (what a hit costs there)
    const double t_dev1  = time_mul_mat_id(upload, pool_w, 1, pc.n_slots, 3) * scale;
    c.fast_flops     = t_dev1 > 0 ? flops_per_token_[(size_t) il] / t_dev1 : 0.0;

    // upstream's op_offload: whether the device computes a batch's host-resident
    // experts itself (after copying them over the link) -- CUDA does from 32 tokens
    ggml_init_params ip = { ggml_tensor_overhead() * 4, nullptr, true };
    ggml_context_ptr ctx(ggml_init(ip));
    ggml_tensor *    x  = ggml_new_tensor_3d(ctx.get(), GGML_TYPE_F32, model_w->ne[0], 1, 32);
    ggml_tensor *    id = ggml_new_tensor_2d(ctx.get(), GGML_TYPE_I32, 1, 32);
    ggml_tensor *    op = ggml_mul_mat_id(ctx.get(), model_w, x, id);
    c.offload_min_batch = ggml_backend_dev_offload_op(ggml_backend_get_device(upload), op) ? 32 : 0;
    return c;
}

}  // namespace pymoe

// Quantisation and dequantisation with ggml's own row quantisers, split over
// threads by rows. Used by the converter (hi and lo expert copies) and by
// anything that needs an expert's weights as floats.
#include "pymoe.h"

#include "ggml.h"

#include <algorithm>
#include <cstring>
#include <stdexcept>
#include <thread>
#include <vector>

namespace pymoe {

namespace {

// ggml_quantize_chunk handles these; the IQ1/IQ2 low-bit types need an
// importance matrix (ggml asserts on a missing one), so they are left out.
const ggml_type k_quant_types[] = {
    GGML_TYPE_F32,   GGML_TYPE_F16,    GGML_TYPE_BF16,  GGML_TYPE_Q8_0,  GGML_TYPE_Q6_K,   GGML_TYPE_Q5_K,
    GGML_TYPE_Q5_1,  GGML_TYPE_Q5_0,   GGML_TYPE_Q4_K,  GGML_TYPE_Q4_1,  GGML_TYPE_Q4_0,   GGML_TYPE_IQ4_XS,
    GGML_TYPE_IQ4_NL, GGML_TYPE_Q3_K,  GGML_TYPE_IQ3_S, GGML_TYPE_IQ3_XXS, GGML_TYPE_Q2_K, GGML_TYPE_IQ2_S,
    GGML_TYPE_MXFP4, GGML_TYPE_TQ2_0,  GGML_TYPE_TQ1_0,
};

bool can_quantize(ggml_type t) {
    return std::find(std::begin(k_quant_types), std::end(k_quant_types), t) != std::end(k_quant_types) &&
           !ggml_quantize_requires_imatrix(t);
}

template <typename F> void parallel_rows(int64_t n_rows, int n_threads, F && fn) {
    n_threads = (int) std::max<int64_t>(1, std::min<int64_t>(n_threads, n_rows));
    if (n_threads == 1) {
        fn(0, n_rows);
        return;
    }
    std::vector<std::thread> workers;
    const int64_t            per = (n_rows + n_threads - 1) / n_threads;
    for (int t = 0; t < n_threads; ++t) {
        const int64_t r0 = t * per;
        const int64_t r1 = std::min(n_rows, r0 + per);
        if (r0 < r1) {
            workers.emplace_back([&fn, r0, r1] { fn(r0, r1); });
        }
    }
    for (auto & w : workers) {
        w.join();
    }
}

int default_threads(int n_threads) {
    return n_threads > 0 ? n_threads : (int) std::max(1u, std::thread::hardware_concurrency());
}

}  // namespace

int32_t ggml_type_from_name(const std::string & name) {
    for (int t = 0; t < GGML_TYPE_COUNT; ++t) {
        const char * n = ggml_type_name((ggml_type) t);
        if (n && ggml_get_type_traits((ggml_type) t)->blck_size > 0 && name == n) {
            return t;
        }
    }
    throw std::invalid_argument("unknown ggml type '" + name + "'; hint: use f32, f16, bf16, q8_0, q4_K, q2_K ...");
}

type_info ggml_type_describe(const std::string & name) {
    const ggml_type t      = (ggml_type) ggml_type_from_name(name);
    const auto *    traits = ggml_get_type_traits(t);
    return { ggml_type_name(t), (int32_t) t, traits->blck_size, traits->type_size, ggml_is_quantized(t),
             can_quantize(t), traits->to_float != nullptr || t == GGML_TYPE_F32 };
}

std::vector<std::string> quant_type_names() {
    std::vector<std::string> out;
    for (ggml_type t : k_quant_types) {
        if (can_quantize(t)) {
            out.emplace_back(ggml_type_name(t));
        }
    }
    return out;
}

uint64_t quant_row_size(const std::string & type, int64_t n_per_row) {
    return ggml_row_size((ggml_type) ggml_type_from_name(type), n_per_row);
}

void quantize_rows(const std::string & type, const float * src, int64_t n_rows, int64_t n_per_row, void * dst,
                   int n_threads) {
    const ggml_type t = (ggml_type) ggml_type_from_name(type);
    if (!can_quantize(t)) {
        throw std::invalid_argument("cannot quantise to '" + type +
                                    "' without an importance matrix; hint: use one of q8_0, q6_K, q5_K, q4_K, q4_0, "
                                    "q3_K, q2_K, iq4_xs ...");
    }
    const int64_t blck = ggml_blck_size(t);
    if (n_rows < 0 || n_per_row <= 0 || n_per_row % blck != 0) {
        throw std::invalid_argument("cannot quantise rows of " + std::to_string(n_per_row) + " values to " + type +
                                    ": the row length must be a multiple of its block size " + std::to_string(blck) +
                                    "; hint: keep this tensor in a float type or pick a type with a smaller block");
    }
    ggml_quantize_init(t);  // tables for the IQ types; thread-safe, once
    parallel_rows(n_rows, default_threads(n_threads), [&](int64_t r0, int64_t r1) {
        // rows [r0, r1): ggml_quantize_chunk reads src + r0 * n_per_row and writes dst + r0 * row_size
        ggml_quantize_chunk(t, src, dst, r0 * n_per_row, r1 - r0, n_per_row, nullptr);
    });
}

void dequantize_rows(const std::string & type, const void * src, int64_t n_rows, int64_t n_per_row, float * dst,
                     int n_threads) {
    const ggml_type t      = (ggml_type) ggml_type_from_name(type);
    const auto *    traits = ggml_get_type_traits(t);
    if (n_rows < 0 || n_per_row <= 0 || n_per_row % traits->blck_size != 0) {
        throw std::invalid_argument("bad shape for dequantising " + type);
    }
    if (t != GGML_TYPE_F32 && !traits->to_float) {
        throw std::invalid_argument("ggml cannot convert '" + type + "' to float");
    }
    const size_t row_size = ggml_row_size(t, n_per_row);
    parallel_rows(n_rows, default_threads(n_threads), [&](int64_t r0, int64_t r1) {
        const char * in  = static_cast<const char *>(src) + r0 * row_size;
        float *      out = dst + r0 * n_per_row;
        if (t == GGML_TYPE_F32) {
            std::memcpy(out, in, (size_t) (r1 - r0) * row_size);
        } else {
            traits->to_float(in, out, (r1 - r0) * n_per_row);
        }
    });
}

}  // namespace pymoe

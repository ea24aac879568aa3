// Reading a GGUF file's header: metadata and tensor table, no weights.
// ggml's own parser does the reading (it validates counts, sizes and
// offsets); this file adds the checks that the parser leaves to the loader,
// such as tensor data lying beyond the end of a truncated file.
#include "pymoe.h"

#include "ggml-cpp.h"
#include "ggml.h"
#include "gguf.h"

#include <cstdio>
#include <filesystem>
#include <stdexcept>

namespace pymoe {

namespace {

gguf_scalar read_scalar(const gguf_context * ctx, int64_t id, gguf_type type) {
    switch (type) {
        case GGUF_TYPE_UINT8:   return (uint64_t) gguf_get_val_u8(ctx, id);
        case GGUF_TYPE_INT8:    return (int64_t) gguf_get_val_i8(ctx, id);
        case GGUF_TYPE_UINT16:  return (uint64_t) gguf_get_val_u16(ctx, id);
        case GGUF_TYPE_INT16:   return (int64_t) gguf_get_val_i16(ctx, id);
        case GGUF_TYPE_UINT32:  return (uint64_t) gguf_get_val_u32(ctx, id);
        case GGUF_TYPE_INT32:   return (int64_t) gguf_get_val_i32(ctx, id);
        case GGUF_TYPE_FLOAT32: return (double) gguf_get_val_f32(ctx, id);
        case GGUF_TYPE_UINT64:  return (uint64_t) gguf_get_val_u64(ctx, id);
        case GGUF_TYPE_INT64:   return (int64_t) gguf_get_val_i64(ctx, id);
        case GGUF_TYPE_FLOAT64: return (double) gguf_get_val_f64(ctx, id);
        case GGUF_TYPE_BOOL:    return (bool) gguf_get_val_bool(ctx, id);
        case GGUF_TYPE_STRING:  return std::string(gguf_get_val_str(ctx, id));
        default:                return std::string("?");
    }
}

template <typename T> gguf_scalar arr_at(const void * data, size_t i) {
    T v = static_cast<const T *>(data)[i];
    if constexpr (std::is_same_v<T, bool>) {
        return v;
    } else if constexpr (std::is_floating_point_v<T>) {
        return (double) v;
    } else if constexpr (std::is_signed_v<T>) {
        return (int64_t) v;
    } else {
        return (uint64_t) v;
    }
}

gguf_scalar read_array_elem(const gguf_context * ctx, int64_t id, gguf_type type, size_t i) {
    const void * data = type == GGUF_TYPE_STRING ? nullptr : gguf_get_arr_data(ctx, id);
    switch (type) {
        case GGUF_TYPE_UINT8:   return arr_at<uint8_t>(data, i);
        case GGUF_TYPE_INT8:    return arr_at<int8_t>(data, i);
        case GGUF_TYPE_UINT16:  return arr_at<uint16_t>(data, i);
        case GGUF_TYPE_INT16:   return arr_at<int16_t>(data, i);
        case GGUF_TYPE_UINT32:  return arr_at<uint32_t>(data, i);
        case GGUF_TYPE_INT32:   return arr_at<int32_t>(data, i);
        case GGUF_TYPE_FLOAT32: return arr_at<float>(data, i);
        case GGUF_TYPE_UINT64:  return arr_at<uint64_t>(data, i);
        case GGUF_TYPE_INT64:   return arr_at<int64_t>(data, i);
        case GGUF_TYPE_FLOAT64: return arr_at<double>(data, i);
        case GGUF_TYPE_BOOL:    return arr_at<bool>(data, i);
        case GGUF_TYPE_STRING:  return std::string(gguf_get_arr_str(ctx, id, i));
        default:                return std::string("?");
    }
}

}  // namespace

gguf_info gguf_read_info(const std::string & path, uint64_t max_array) {
    std::error_code ec;
    if (!std::filesystem::is_regular_file(path, ec)) {
        throw std::runtime_error("'" + path + "' is not a file; hint: pass the path of a .gguf file");
    }
    const uint64_t file_size = std::filesystem::file_size(path, ec);

    log_clear_errors();
    gguf_init_params params = { /*.no_alloc =*/true, /*.ctx =*/nullptr };
    gguf_context_ptr ctx(gguf_init_from_file(path.c_str(), params));
    if (!ctx) {
        std::string why = log_take_errors();
        throw std::runtime_error("'" + path + "' is not a valid GGUF file" + (why.empty() ? "" : ": " + why) +
                                 "\nhint: the file may be truncated or not a GGUF model; download or convert it again");
    }

    gguf_info info;
    info.version     = gguf_get_version(ctx.get());
    info.alignment   = gguf_get_alignment(ctx.get());
    info.data_offset = gguf_get_data_offset(ctx.get());
    info.file_size   = file_size;

    const int64_t n_kv = gguf_get_n_kv(ctx.get());
    for (int64_t i = 0; i < n_kv; ++i) {
        gguf_value v;
        const gguf_type type = gguf_get_kv_type(ctx.get(), i);
        v.type               = gguf_type_name(type);
        if (type == GGUF_TYPE_ARRAY) {
            const gguf_type at = gguf_get_arr_type(ctx.get(), i);
            v.arr_type         = gguf_type_name(at);
            v.arr_n            = gguf_get_arr_n(ctx.get(), i);
            if (v.arr_n <= max_array && at != GGUF_TYPE_ARRAY) {
                for (size_t j = 0; j < v.arr_n; ++j) {
                    v.arr.push_back(read_array_elem(ctx.get(), i, at, j));
                }
            }
        } else {
            v.scalar = read_scalar(ctx.get(), i, type);
        }
        info.kv.emplace_back(gguf_get_key(ctx.get(), i), std::move(v));
    }

    const int64_t n_tensors = gguf_get_n_tensors(ctx.get());
    for (int64_t i = 0; i < n_tensors; ++i) {
        gguf_tensor_info t;
        t.name                = gguf_get_tensor_name(ctx.get(), i);
        const ggml_type type  = gguf_get_tensor_type(ctx.get(), i);
        t.type                = ggml_type_name(type);
        t.type_id             = (int32_t) type;
        const int64_t * ne    = gguf_get_tensor_ne(ctx.get(), i);
        int             n_dim = GGML_MAX_DIMS;
        while (n_dim > 1 && ne[n_dim - 1] == 1) {
            --n_dim;
        }
        t.shape.assign(ne, ne + n_dim);
        t.nbytes = gguf_get_tensor_size(ctx.get(), i);
        t.offset = info.data_offset + gguf_get_tensor_offset(ctx.get(), i);
        if (t.offset + t.nbytes > file_size) {
            throw std::runtime_error("'" + path + "': tensor '" + t.name + "' ends at byte " +
                                     std::to_string(t.offset + t.nbytes) + " but the file has only " +
                                     std::to_string(file_size) +
                                     " bytes\nhint: the file is truncated; download or convert it again");
        }
        info.tensors.push_back(std::move(t));
    }
    return info;
}

gguf_moe_counts gguf_read_moe_counts(const gguf_info & info) {
    gguf_moe_counts c;
    for (const auto & kv : info.kv) {
        if (kv.first == "general.architecture" && std::holds_alternative<std::string>(kv.second.scalar)) {
            c.arch = std::get<std::string>(kv.second.scalar);
        }
    }
    auto as_int = [](const gguf_scalar & v) -> int64_t {
        if (const auto * u = std::get_if<uint64_t>(&v)) {
            return (int64_t) *u;
        }
        if (const auto * i = std::get_if<int64_t>(&v)) {
            return *i;
        }
        return 0;
    };
    for (const auto & kv : info.kv) {
        if (kv.first == c.arch + ".block_count") {
            c.n_layer = as_int(kv.second.scalar);
        } else if (kv.first == c.arch + ".expert_count") {
            c.n_expert = as_int(kv.second.scalar);
        }
    }
    return c;
}

}  // namespace pymoe

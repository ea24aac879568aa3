// pybind11 bindings for the pymoe core: type conversion only. Long calls
// (model loading, decoding) release the GIL.
#include "pymoe.h"

#include "pymoe-planner.h"
#include "pymoe-policy.h"
#include "pymoe-prefetch.h"
#include "pymoe-simulator.h"

#include "ggml.h"
#include "llama.h"

#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <memory>
#include <optional>
#include <stdexcept>

namespace py = pybind11;

namespace {

py::object scalar_to_py(const pymoe::gguf_scalar & s) {
    return std::visit([](const auto & v) -> py::object { return py::cast(v); }, s);
}

py::dict gguf_info_to_py(const pymoe::gguf_info & info) {
    py::dict kv;
    for (const auto & [key, v] : info.kv) {
        if (v.type == "arr") {
            if (v.arr.size() == v.arr_n) {
                py::list items;
                for (const auto & e : v.arr) {
                    items.append(scalar_to_py(e));
                }
                kv[py::str(key)] = items;
            } else {
                kv[py::str(key)] = py::dict(py::arg("array_type") = v.arr_type, py::arg("length") = v.arr_n);
            }
        } else {
            kv[py::str(key)] = scalar_to_py(v.scalar);
        }
    }
    py::list tensors;
    for (const auto & t : info.tensors) {
        tensors.append(py::dict(py::arg("name") = t.name, py::arg("type") = t.type, py::arg("type_id") = t.type_id,
                                py::arg("shape") = py::tuple(py::cast(t.shape)), py::arg("nbytes") = t.nbytes,
                                py::arg("offset") = t.offset));
    }
    return py::dict(py::arg("version") = info.version, py::arg("alignment") = info.alignment,
                    py::arg("data_offset") = info.data_offset, py::arg("file_size") = info.file_size,
                    py::arg("metadata") = kv, py::arg("tensors") = tensors);
}

// Owns the native model so that Python can free it deterministically
// (close() / a with-block) instead of waiting for the garbage collector.
class py_model {
  public:
    explicit py_model(const pymoe::model_params & p) {
        py::gil_scoped_release release;
        m_ = std::make_unique<pymoe::model>(p);
    }

    pymoe::model & get() {
        if (!m_) {
            throw std::invalid_argument("the model is closed; hint: load it again");
        }
        return *m_;
    }

    void close() { m_.reset(); }

    bool closed() const { return !m_; }

  private:
    std::unique_ptr<pymoe::model> m_;
};

using i32_array = py::array_t<int32_t, py::array::c_style | py::array::forcecast>;
using i8_array  = py::array_t<int8_t, py::array::c_style | py::array::forcecast>;
using f32_array = py::array_t<float, py::array::c_style | py::array::forcecast>;

py::array_t<int32_t> to_numpy(std::vector<int32_t> && v) {
    auto * heap = new std::vector<int32_t>(std::move(v));
    py::capsule owner(heap, [](void * p) { delete static_cast<std::vector<int32_t> *>(p); });
    return py::array_t<int32_t>((py::ssize_t) heap->size(), heap->data(), owner);
}

py::dict layer_stats_to_py(const pymoe::layer_stats & l) {
    py::dict d;
#define PYMOE_COUNTER_TO_PY(type, name, doc) d[#name] = l.name;
    PYMOE_LAYER_COUNTERS(PYMOE_COUNTER_TO_PY)
#undef PYMOE_COUNTER_TO_PY
    return d;
}

py::dict offload_stats_to_py(const pymoe::offload_stats & s) {
    py::list layers;
    for (const auto & l : s.layers) {
        layers.append(layer_stats_to_py(l));
    }
    py::array_t<uint64_t> pairs({ (py::ssize_t) s.n_layer, (py::ssize_t) s.n_expert });
    std::copy(s.expert_pairs.begin(), s.expert_pairs.end(), pairs.mutable_data());
    return py::dict(py::arg("tier") = s.tier, py::arg("budget") = s.budget, py::arg("pool_bytes") = s.pool_bytes,
                    py::arg("n_slots") = s.n_slots, py::arg("n_layer") = s.n_layer, py::arg("n_expert") = s.n_expert,
                    py::arg("policy") = s.policy, py::arg("read_bandwidth") = s.read_bandwidth,
                    py::arg("layers") = layers, py::arg("expert_pairs") = pairs,
                    py::arg("pool_bytes_lo") = s.pool_bytes_lo, py::arg("n_slots_lo") = s.n_slots_lo,
                    py::arg("lo_threshold") = s.lo_threshold, py::arg("prefetch") = s.prefetch,
                    py::arg("prefetch_busy_seconds") = s.prefetch_busy_seconds,
                    py::arg("direct_bandwidth") = s.direct_bandwidth, py::arg("cpu_flops") = s.cpu_flops,
                    py::arg("device_flops") = s.device_flops, py::arg("offload_min_batch") = s.offload_min_batch,
                    py::arg("token_seconds") = s.token_seconds, py::arg("pools_by_buffer") = s.pools_by_buffer,
                    py::arg("ids_bytes") = s.ids_bytes, py::arg("bounce_bytes") = s.bounce_bytes,
                    py::arg("router_copy_bytes") = s.router_copy_bytes);
}

py::array_t<float> decode(py_model & self, const i32_array & tokens, const i32_array & pos, const i32_array & seq,
                          const i8_array & want) {
    pymoe::model & m = self.get();
    const py::ssize_t n = tokens.size();
    if (tokens.ndim() != 1 || pos.size() != n || seq.size() != n || want.size() != n) {
        throw std::invalid_argument("decode: tokens, pos, seq and want must be 1-D arrays of the same length");
    }
    py::ssize_t n_want = 0;
    for (py::ssize_t i = 0; i < n; ++i) {
        n_want += want.data()[i] != 0;
    }
    py::array_t<float> out({ n_want, (py::ssize_t) m.n_vocab() });
    float * out_data = out.mutable_data();
    {
        py::gil_scoped_release release;
        m.decode(tokens.data(), pos.data(), seq.data(), want.data(), (int32_t) n, out_data);
    }
    return out;
}

}  // namespace

PYBIND11_MODULE(_core, mod) {
    mod.doc() = "pymoe native core: llama.cpp (pinned, patched) and the pymoe engine";

    llama_backend_init();
    pymoe::log_set_level(GGML_LOG_LEVEL_NONE + 100);

    mod.def("llama_commit", &pymoe::llama_commit, "The pinned upstream llama.cpp commit this build uses.");
    mod.def("system_info", &pymoe::system_info, "llama.cpp's CPU/backend feature line and the CPU's extra buffer types.");
    mod.def("cpu_extra_buffer_types", &pymoe::cpu_extra_buffer_types,
            "Where llama.cpp may repack weights on the CPU (e.g. CPU_REPACK; AMX only with PYMOE_CPU_AMX=ON).");
    mod.def("build_cpu_amx", &pymoe::build_cpu_amx, "Whether this build allowed ggml's AMX repacking.");
    mod.def("supports_gpu_offload", &pymoe::has_local_gpu, "Whether this machine has a GPU this build can use.");
    mod.def("set_log_level", &pymoe::log_set_level, py::arg("min_level"),
            "Forward llama.cpp/ggml log lines of at least this level to stderr (1 debug, 2 info, 3 warn, 4 error; "
            "a larger value silences them).");
    mod.def("get_log_level", &pymoe::log_get_level);
    mod.def("take_log_errors", &pymoe::log_take_errors, "Error lines logged since the last call.");

    mod.def(
        "read_gguf",
        [](const std::string & path, uint64_t max_array) {
            pymoe::gguf_info info;
            {
                py::gil_scoped_release release;
                info = pymoe::gguf_read_info(path, max_array);
            }
            return gguf_info_to_py(info);
        },
        py::arg("path"), py::arg("max_array") = 64,
        "Reads a GGUF header (metadata and tensor table) without loading weights.");
    mod.def(
        "gguf_problems",
        [](const std::string & path) {
            py::gil_scoped_release release;
            return pymoe::gguf_problems(path);
        },
        py::arg("path"),
        "What in a GGUF would make llama.cpp abort instead of failing to load (one message each; empty: none).");
    mod.def(
        "check_loadable",
        [](const std::string & path) {
            py::gil_scoped_release release;
            pymoe::gguf_check_loadable(path);
        },
        py::arg("path"),
        "A dry run of llama.cpp's loader (metadata, vocabulary, tensor names/shapes/types; no weights read); "
        "raises RuntimeError with its reason.");

    // --- platform: what this OS lets the disk tier do, available memory, the read path for tests
    mod.def(
        "platform_capabilities",
        [](const std::string & path) {
            const pymoe::platform_caps c = pymoe::platform_capabilities(path);
            return py::dict(py::arg("os") = c.os, py::arg("uncached_reads") = c.uncached_reads,
                            py::arg("drop_file_cache") = c.drop_file_cache,
                            py::arg("mapping_will_need") = c.mapping_will_need,
                            py::arg("mapping_release") = c.mapping_release, py::arg("memory_limit") = c.memory_limit,
                            py::arg("available_memory") = c.available_memory);
        },
        py::arg("path") = "",
        "What this OS lets the disk tier do; with a path, uncached_reads is that file system's answer.");
    mod.def("available_memory", &pymoe::available_memory,
            "Bytes this process may still use (Linux: capped by its cgroup's memory limit).");
    mod.def(
        "platform_read",
        [](const std::string & path, uint64_t offset, uint64_t size, bool uncached) {
            std::string out;
            {
                py::gil_scoped_release release;
                out = pymoe::platform_read(path, offset, size, uncached);
            }
            return py::bytes(out);
        },
        py::arg("path"), py::arg("offset"), py::arg("size"), py::arg("uncached") = true,
        "Reads a byte range through the platform layer, as an expert store does (for tests).");
    mod.def(
        "expert_read",
        [](const std::string & path, int32_t il, int32_t e, bool direct_io) {
            std::vector<std::string> parts;
            {
                py::gil_scoped_release release;
                parts = pymoe::expert_read(path, il, e, direct_io);
            }
            py::list out;
            for (const auto & p : parts) {
                out.append(py::bytes(p));
            }
            return out;
        },
        py::arg("path"), py::arg("layer"), py::arg("expert"), py::arg("direct_io") = true,
        "Reads one expert as a slot load does: each projection's bytes (gate, up, down or gate_up, down).");
    mod.def(
        "stream_probe",
        [](const std::string & path, const py::list & layers) {
            std::vector<pymoe::stream_probe_layer> ls;
            for (const auto & item : layers) {
                const auto                t = item.cast<py::tuple>();
                pymoe::stream_probe_layer l;
                l.il      = t[0].cast<int32_t>();
                l.experts = t[1].cast<std::vector<int32_t>>();
                l.asks    = t[2].cast<std::vector<std::pair<int32_t, int32_t>>>();
                ls.push_back(std::move(l));
            }
            std::pair<std::vector<std::string>, uint64_t> r;
            {
                py::gil_scoped_release release;
                r = pymoe::stream_probe(path, ls);
            }
            py::list got;
            for (const auto & b : r.first) {
                got.append(py::bytes(b));
            }
            return py::make_tuple(got, r.second);
        },
        py::arg("path"), py::arg("layers"),
        "Tests: the disk tier's stream over `path`; layers = [(layer, experts, [(projection, expert) asked in "
        "order])]. Returns ([bytes handed over per ask, b'' where the mapping would serve], fallbacks).");
    mod.def("stream_ring_bytes", &pymoe::stream_ring_bytes, py::arg("path"),
            "Bytes of the disk tier's stream ring (the direct branch's read-ahead buffers) for this model.");
    mod.def("io_fault", &pymoe::io_fault_set, py::arg("kind"), py::arg("nth"), py::arg("count") = 1,
            "Tests: read requests nth .. nth+count-1 from now fail (kind: eio, short, eintr, partial).");
    mod.def("io_fault_clear", &pymoe::io_fault_clear);

    // --- ggml types and quantisation
    mod.def("quant_types", &pymoe::quant_type_names, "Types `quantize` accepts (no importance matrix needed).");
    mod.def(
        "type_info",
        [](const std::string & name) {
            const pymoe::type_info t = pymoe::ggml_type_describe(name);
            return py::dict(py::arg("name") = t.name, py::arg("id") = t.id, py::arg("block_size") = t.block_size,
                            py::arg("type_size") = t.type_size, py::arg("quantized") = t.quantized,
                            py::arg("can_quantize") = t.can_quantize, py::arg("can_dequantize") = t.can_dequantize);
        },
        py::arg("name"));
    mod.def("row_size", &pymoe::quant_row_size, py::arg("type"), py::arg("n_per_row"),
            "Bytes of one row of n_per_row values in a ggml type.");
    mod.def(
        "quantize",
        [](const f32_array & src, const std::string & type, int n_threads) {
            if (src.ndim() != 2) {
                throw std::invalid_argument("quantize: expected a 2-D float32 array [n_rows, n_per_row]");
            }
            const int64_t n_rows = src.shape(0), n_per_row = src.shape(1);
            const auto    row    = (py::ssize_t) pymoe::quant_row_size(type, n_per_row);
            py::array_t<uint8_t> out({ (py::ssize_t) n_rows, row });
            uint8_t *            dst  = out.mutable_data();
            const float *        data = src.data();
            {
                py::gil_scoped_release release;
                pymoe::quantize_rows(type, data, n_rows, n_per_row, dst, n_threads);
            }
            return out;
        },
        py::arg("src"), py::arg("type"), py::arg("n_threads") = 0,
        "float32 [n_rows, n_per_row] -> the ggml type's bytes, uint8 [n_rows, row_size].");
    mod.def(
        "dequantize",
        [](const py::array_t<uint8_t, py::array::c_style | py::array::forcecast> & src, const std::string & type,
           int64_t n_per_row, int n_threads) {
            const auto row = (py::ssize_t) pymoe::quant_row_size(type, n_per_row);
            if (row <= 0 || src.size() % row != 0) {
                throw std::invalid_argument("dequantize: the data is not a whole number of " + type + " rows of " +
                                            std::to_string(n_per_row) + " values");
            }
            const int64_t      n_rows = src.size() / row;
            py::array_t<float> out({ (py::ssize_t) n_rows, (py::ssize_t) n_per_row });
            float *            dst  = out.mutable_data();
            const uint8_t *    data = src.data();
            {
                py::gil_scoped_release release;
                pymoe::dequantize_rows(type, data, n_rows, n_per_row, dst, n_threads);
            }
            return out;
        },
        py::arg("src"), py::arg("type"), py::arg("n_per_row"), py::arg("n_threads") = 0,
        "The bytes of whole rows of a ggml type -> float32 [n_rows, n_per_row].");

    // --- the engine's pure parts, for tests and the trace simulator
    mod.def("policy_names", &pymoe::eviction_policy_names);
    // a slot_view from (layer, expert, last_use, uses, profile, hi_uses[, recent[, next_use[, p_next]]])
    auto to_view = [](const py::sequence & x) {
        if (x.size() < 6 || x.size() > 9) {
            throw std::invalid_argument(
                "a slot is (layer, expert, last_use, uses, profile, hi_uses[, recent[, next_use[, p_next]]])");
        }
        pymoe::slot_view v{ x[0].cast<int32_t>(),  x[1].cast<int32_t>(), x[2].cast<uint64_t>(),
                            x[3].cast<uint64_t>(), x[4].cast<double>(),  x[5].cast<uint64_t>() };
        if (x.size() > 6) {
            v.recent = x[6].cast<double>();
        }
        if (x.size() > 7 && !x[7].is_none()) {
            v.next_use = x[7].cast<uint64_t>();
        }
        if (x.size() > 8) {
            v.p_next = x[8].cast<double>();
        }
        return v;
    };
    mod.def(
        "policy_pick_victim",
        [to_view](const std::string & name, const std::vector<py::sequence> & slots,
                  const std::tuple<double, double, double> & weights) {
            if (slots.empty()) {
                throw std::invalid_argument("policy_pick_victim: no candidates");
            }
            std::vector<pymoe::slot_view> v;
            for (const auto & x : slots) {
                v.push_back(to_view(x));
            }
            const auto [wr, wf, wp] = weights;
            return pymoe::make_eviction_policy(name, { wr, wf, wp })->pick_victim(v.data(), v.size());
        },
        py::arg("policy"), py::arg("slots"), py::arg("weights") = std::make_tuple(1.0, 1.0, 1.0),
        "Index of the slot the policy evicts; slots = [(layer, expert, last_use, uses, profile, hi_uses[, recent"
        "[, next_use (None: never)[, p_next]]])].");
    mod.def(
        "policy_admit",
        [to_view](const std::string & name, const py::sequence & newcomer, const py::sequence & victim) {
            return pymoe::make_eviction_policy(name)->admit(to_view(newcomer), to_view(victim));
        },
        py::arg("policy"), py::arg("newcomer"), py::arg("victim"),
        "Background admission: whether the newcomer is worth the victim's slot (slots as policy_pick_victim's).");
    mod.def(
        "policy_admits_on_miss", [](const std::string & name) { return pymoe::make_eviction_policy(name)->admits_on_miss(); },
        py::arg("policy"));
    mod.def(
        "policy_needs_future", [](const std::string & name) { return pymoe::make_eviction_policy(name)->needs_future(); },
        py::arg("policy"), "An offline policy: it reads the trace's future (pymoe simulate only).");
    mod.def(
        "plan_layer",
        [](const std::vector<std::tuple<int32_t, int32_t, float, bool, bool>> & experts, int32_t capacity, bool admit,
           uint64_t expert_bytes, double flops_per_token, double read_bw, double direct_bw, double fast_flops,
           double slow_flops, double reuse, bool assist, int32_t capacity_lo, float lo_threshold,
           uint64_t expert_bytes_lo) {
            pymoe::plan_request req;
            for (const auto & [e, n, w, cached, cached_lo] : experts) {
                req.experts.push_back({ e, n, w, cached, cached_lo });
            }
            req.capacity        = capacity;
            req.capacity_lo     = capacity_lo;
            req.lo_threshold    = lo_threshold;
            req.expert_bytes_lo = expert_bytes_lo;
            req.admit           = admit;
            req.assist          = assist;
            req.expert_bytes    = expert_bytes;
            req.flops_per_token = flops_per_token;
            req.cost            = { read_bw, direct_bw, fast_flops, slow_flops, reuse };
            std::vector<int> out;
            for (auto a : pymoe::plan_layer(req)) {
                out.push_back((int) a);
            }
            return out;
        },
        py::arg("experts"), py::arg("capacity"), py::arg("admit") = true, py::arg("expert_bytes") = 0,
        py::arg("flops_per_token") = 0.0, py::arg("read_bw") = 0.0, py::arg("direct_bw") = 0.0,
        py::arg("fast_flops") = 0.0, py::arg("slow_flops") = 0.0, py::arg("reuse") = 1.0, py::arg("assist") = true,
        py::arg("capacity_lo") = 0, py::arg("lo_threshold") = 0.0f, py::arg("expert_bytes_lo") = 0,
        "Actions (0 hit, 1 load, 2 direct, 3 hit low, 4 load low) for experts = "
        "[(expert, n_tokens, max weight, cached, cached low)].");
    mod.def(
        "relative_gate_weights",
        [](const f32_array & w) {
            if (w.ndim() != 2) {
                throw std::invalid_argument("weights must be [n_tokens, n_used]");
            }
            py::array_t<float> out({ w.shape(0), w.shape(1) });
            std::copy(w.data(), w.data() + w.size(), out.mutable_data());
            pymoe::relative_gate_weights(out.mutable_data(), w.shape(0), w.shape(1));
            return out;
        },
        py::arg("weights"), "The weights the planner compares with lo_threshold: each row over its sum.");
    mod.def(
        "router_topk",
        [](const f32_array & w, const f32_array & x, int32_t k, int32_t gating, std::optional<f32_array> bias) {
            if (w.ndim() != 2 || x.ndim() != 2 || w.shape(1) != x.shape(1)) {
                throw std::invalid_argument("router_topk: w [n_expert, n_embd] and x [n_tokens, n_embd]");
            }
            std::vector<pymoe::predicted_expert> out;
            pymoe::router_topk(w.data(), bias ? bias->data() : nullptr, gating, w.shape(0), w.shape(1), x.data(),
                               x.shape(0), k, out);
            return out;
        },
        py::arg("w"), py::arg("x"), py::arg("k"), py::arg("gating") = 1, py::arg("bias") = py::none(),
        "The predictor's top-k: [(expert, largest normalised weight)] over the tokens of x.");

    mod.def(
        "offload_plan",
        [](const std::string & path, uint64_t budget, bool per_layer) {
            uint64_t               planned = 0;
            std::vector<pymoe::pool_plan> plan;
            {
                py::gil_scoped_release release;
                plan = pymoe::offload_plan(path, budget, &planned, per_layer);
            }
            py::list pools;
            for (const auto & p : plan) {
                pools.append(py::dict(py::arg("layers") = p.layers, py::arg("slot_bytes") = p.slot_bytes,
                                      py::arg("n_slots") = p.n_slots, py::arg("n_experts") = p.n_experts));
            }
            return py::dict(py::arg("pools") = pools, py::arg("bytes") = planned);
        },
        py::arg("path"), py::arg("budget"), py::arg("per_layer") = true,
        "How `budget` bytes would split over the model's slot pools.");

    py::class_<pymoe::routing_model>(mod, "RoutingModel",
                                     "The markov policy's predictor of a layer's next step (pymoe-policy.h).")
        .def(py::init<int32_t, int32_t, double, double, int32_t, double>(), py::arg("n_layer"), py::arg("n_expert"),
             py::arg("half_life") = 32.0, py::arg("prior") = 4.0, py::arg("depth") = 3, py::arg("base_half_life") = 0.0)
        .def(
            "observe",
            [](pymoe::routing_model & self, int32_t layer, const std::vector<int32_t> & experts,
               const std::vector<float> & weights) {
                if (experts.size() != weights.size()) {
                    throw std::invalid_argument("observe: one weight per expert");
                }
                self.observe(layer, experts.data(), weights.data(), (int64_t) experts.size());
            },
            py::arg("layer"), py::arg("experts"), py::arg("weights"))
        .def("p_next", &pymoe::routing_model::p_next, py::arg("layer"), py::arg("expert"));

    py::class_<pymoe::cache_simulator>(mod, "CacheSimulator",
                                       "Replays routing decisions through the engine's cache, policies and planner.")
        .def(py::init([](int32_t n_layer, int32_t n_expert, uint64_t expert_bytes, uint64_t expert_bytes_lo,
                         uint64_t budget, double lo_share, float lo_threshold, const std::string & policy,
                         const std::tuple<double, double, double> & weights, bool per_layer, bool assist,
                         double link_bw, double direct_bw, double fast_flops, double slow_flops, double reuse,
                         double flops_per_token, double layer_seconds, bool admission, bool prefetch,
                         double horizon_scale, float skip_threshold) {
                 pymoe::sim_params p;
                 p.n_layer         = n_layer;
                 p.n_expert        = n_expert;
                 p.expert_bytes    = expert_bytes;
                 p.expert_bytes_lo = expert_bytes_lo;
                 p.budget          = budget;
                 p.lo_share        = lo_share;
                 p.lo_threshold    = lo_threshold;
                 p.policy          = policy;
                 std::tie(p.weights.recency, p.weights.frequency, p.weights.precision) = weights;
                 p.per_layer       = per_layer;
                 p.assist          = assist;
                 p.cost            = { link_bw, direct_bw, fast_flops, slow_flops, reuse };
                 p.flops_per_token = flops_per_token;
                 p.layer_seconds   = layer_seconds;
                 p.admission       = admission;
                 p.prefetch        = prefetch;
                 p.horizon_scale   = horizon_scale;
                 p.skip_threshold  = skip_threshold;
                 return std::make_unique<pymoe::cache_simulator>(p);
             }),
             py::arg("n_layer"), py::arg("n_expert"), py::arg("expert_bytes"), py::arg("expert_bytes_lo") = 0,
             py::arg("budget") = 0, py::arg("lo_share") = 0.25, py::arg("lo_threshold") = 0.0f,
             py::arg("policy") = "lru", py::arg("weights") = std::make_tuple(1.0, 1.0, 1.0),
             py::arg("per_layer") = true, py::arg("assist") = true, py::arg("link_bw") = 0.0,
             py::arg("direct_bw") = 0.0, py::arg("fast_flops") = 0.0, py::arg("slow_flops") = 0.0,
             py::arg("reuse") = 1.0, py::arg("flops_per_token") = 0.0, py::arg("layer_seconds") = 0.0,
             py::arg("admission") = true, py::arg("prefetch") = true, py::arg("horizon_scale") = 1.0,
             py::arg("skip_threshold") = 0.0f)
        .def(
            "run",
            [](pymoe::cache_simulator & self, const i32_array & ids, const f32_array & weights,
               std::optional<std::vector<int64_t>> ubatches, std::optional<i32_array> guesses) {
                // ids, weights: [n_tokens, n_layer, k]; ubatches: tokens per step (default one each);
                // guesses: [n, 4] (token, layer, target layer, expert)
                if (ids.ndim() != 3 || weights.ndim() != 3 || ids.shape(0) != weights.shape(0) ||
                    ids.shape(1) != weights.shape(1) || ids.shape(2) != weights.shape(2)) {
                    throw std::invalid_argument("run: ids and weights must both be [n_tokens, n_layer, k]");
                }
                pymoe::sim_trace tr;
                tr.experts  = ids.data();
                tr.weights  = weights.data();
                tr.n_tokens = ids.shape(0);
                tr.n_layer  = ids.shape(1);
                tr.k        = ids.shape(2);
                if (ubatches) {
                    tr.ubatches = *ubatches;
                }
                if (guesses && guesses->size() > 0) {
                    if (guesses->ndim() != 2 || guesses->shape(1) != 4) {
                        throw std::invalid_argument("run: guesses must be [n, 4] (token, layer, target, expert)");
                    }
                    const int32_t * g = guesses->data();
                    for (py::ssize_t i = 0; i < guesses->shape(0); ++i, g += 4) {
                        tr.guesses.push_back({ g[0], g[1], g[2], g[3] });
                    }
                }
                py::gil_scoped_release release;
                self.run(tr);
            },
            py::arg("ids"), py::arg("weights"), py::arg("ubatches") = py::none(), py::arg("guesses") = py::none())
        .def("result", [](const pymoe::cache_simulator & self) {
            const pymoe::sim_result & r = self.result();
            return py::dict(py::arg("tokens") = r.tokens, py::arg("steps") = r.steps, py::arg("pairs") = r.pairs,
                            py::arg("hits") = r.hits, py::arg("hits_lo") = r.hits_lo, py::arg("misses") = r.misses,
                            py::arg("loads") = r.loads, py::arg("loads_lo") = r.loads_lo, py::arg("direct") = r.direct,
                            py::arg("evictions") = r.evictions, py::arg("upgrades") = r.upgrades,
                            py::arg("lo_pairs") = r.lo_pairs, py::arg("bytes_moved") = r.bytes_moved,
                            py::arg("seconds") = r.seconds, py::arg("n_slots") = r.n_slots,
                            py::arg("n_slots_lo") = r.n_slots_lo, py::arg("admissions") = r.admissions,
                            py::arg("bytes_admitted") = r.bytes_admitted,
                            py::arg("link_busy_seconds") = r.link_busy_seconds,
                            py::arg("prefetch_loads") = r.prefetch_loads, py::arg("prefetch_bytes") = r.prefetch_bytes,
                            py::arg("prefetch_hits") = r.prefetch_hits,
                            py::arg("prefetch_wait_seconds") = r.prefetch_wait_seconds,
                            py::arg("skipped") = r.skipped, py::arg("skipped_pairs") = r.skipped_pairs);
        });

    // --- settings: the C++ structs, bound once; their defaults are the only ones (pymoe.Settings reads them)
    py::class_<pymoe::offload_params>(mod, "OffloadParams", "The expert-offload engine's settings (pymoe.h).")
        .def(py::init<>())
        .def_readwrite("enabled", &pymoe::offload_params::enabled)
        .def_readwrite("tier", &pymoe::offload_params::tier)
        .def_readwrite("budget", &pymoe::offload_params::budget)
        .def_readwrite("policy", &pymoe::offload_params::policy)
        .def_readwrite("per_layer", &pymoe::offload_params::per_layer)
        .def_readwrite("w_recency", &pymoe::offload_params::w_recency)
        .def_readwrite("w_frequency", &pymoe::offload_params::w_frequency)
        .def_readwrite("w_precision", &pymoe::offload_params::w_precision)
        .def_readwrite("profile", &pymoe::offload_params::profile)
        .def_readwrite("cpu_assist", &pymoe::offload_params::cpu_assist)
        .def_readwrite("direct_io", &pymoe::offload_params::direct_io)
        .def_readwrite("io_threads", &pymoe::offload_params::io_threads)
        .def_readwrite("stream", &pymoe::offload_params::stream)
        .def_readwrite("lo_path", &pymoe::offload_params::lo_path)
        .def_readwrite("lo_share", &pymoe::offload_params::lo_share)
        .def_readwrite("lo_threshold", &pymoe::offload_params::lo_threshold)
        .def_readwrite("prefetch", &pymoe::offload_params::prefetch)
        .def_readwrite("prefetch_depth", &pymoe::offload_params::prefetch_depth)
        .def_readwrite("prefetch_max_tokens", &pymoe::offload_params::prefetch_max_tokens)
        .def_readwrite("admission", &pymoe::offload_params::admission)
        .def_readwrite("skip_threshold", &pymoe::offload_params::skip_threshold)
        .def_readwrite("skip_renormalize", &pymoe::offload_params::skip_renormalize)
        .def_readwrite("replay", &pymoe::offload_params::replay)
        .def_readwrite("replay_weights", &pymoe::offload_params::replay_weights)
        .def_readwrite("record_path", &pymoe::offload_params::record_path);
    py::class_<pymoe::model_params>(mod, "ModelParams", "How a model is loaded (pymoe.h).")
        .def(py::init<>())
        .def_readwrite("path", &pymoe::model_params::path)
        .def_readwrite("n_ctx", &pymoe::model_params::n_ctx)
        .def_readwrite("n_batch", &pymoe::model_params::n_batch)
        .def_readwrite("n_ubatch", &pymoe::model_params::n_ubatch)
        .def_readwrite("n_seq_max", &pymoe::model_params::n_seq_max)
        .def_readwrite("n_threads", &pymoe::model_params::n_threads)
        .def_readwrite("n_gpu_layers", &pymoe::model_params::n_gpu_layers)
        .def_readwrite("use_mmap", &pymoe::model_params::use_mmap)
        .def_readwrite("flash_attn", &pymoe::model_params::flash_attn)
        .def_readwrite("repack", &pymoe::model_params::repack)
        .def_readwrite("cache_type", &pymoe::model_params::cache_type)
        .def_readwrite("rpc", &pymoe::model_params::rpc)
        .def_readwrite("offload", &pymoe::model_params::offload);
    mod.def(
        "layer_counters",
        [] {
            py::list out;
#define PYMOE_COUNTER_DESCRIBE(type, name, doc) out.append(py::make_tuple(#name, #type, doc));
            PYMOE_LAYER_COUNTERS(PYMOE_COUNTER_DESCRIBE)
#undef PYMOE_COUNTER_DESCRIBE
            return out;
        },
        "The engine's per-layer counters: [(name, C type, meaning)], in the order of pymoe.h's table.");
    // --- devices
    mod.def(
        "devices",
        [] {
            py::list out;
            for (const auto & d : pymoe::list_devices()) {
                out.append(py::dict(py::arg("name") = d.name, py::arg("description") = d.description,
                                    py::arg("type") = d.type, py::arg("free") = d.free, py::arg("total") = d.total,
                                    py::arg("endpoint") = d.endpoint, py::arg("host_buffer") = d.host_buffer));
            }
            return out;
        },
        "The devices this build can use: local backends, and RPC servers connected so far.");
    mod.def(
        "connect_rpc",
        [](const std::vector<std::string> & endpoints) {
            py::gil_scoped_release release;
            return pymoe::rpc_devices(endpoints).size();
        },
        py::arg("endpoints"), "Connects to ggml RPC servers (HOST:PORT); returns how many devices they offer.");
    mod.def(
        "rpc_serve",
        [](const std::string & host, int32_t port, int32_t n_threads) {
            py::gil_scoped_release release;
            pymoe::rpc_serve(host, port, n_threads);
        },
        py::arg("host"), py::arg("port"), py::arg("n_threads") = 0,
        "Serves this build's CPU backend as a ggml RPC device; blocks while it serves.");
    mod.def("default_n_ctx", &pymoe::default_n_ctx, py::arg("n_ctx_train"),
            "The context length a model gets when none is asked for.");

    py::class_<py_model>(mod, "Model")
        .def(py::init([](const pymoe::model_params & p) { return std::make_unique<py_model>(p); }), py::arg("params"))
        .def("close", &py_model::close)
        .def_property_readonly("closed", &py_model::closed)
        // vocab
        .def(
            "tokenize",
            [](py_model & self, const std::string & text, bool add_special, bool parse_special) {
                return to_numpy(self.get().tokenize(text, add_special, parse_special));
            },
            py::arg("text"), py::arg("add_special") = true, py::arg("parse_special") = false)
        .def(
            "detokenize",
            [](py_model & self, const std::vector<int32_t> & tokens, bool remove_special, bool unparse_special) {
                return py::bytes(self.get().detokenize(tokens, remove_special, unparse_special));
            },
            py::arg("tokens"), py::arg("remove_special") = false, py::arg("unparse_special") = false)
        .def(
            "token_to_piece",
            [](py_model & self, int32_t token, bool special) {
                return py::bytes(self.get().token_to_piece(token, special));
            },
            py::arg("token"), py::arg("special") = false)
        .def("token_is_eog", [](py_model & self, int32_t t) { return self.get().token_is_eog(t); })
        .def_property_readonly("token_bos", [](py_model & self) { return self.get().token_bos(); })
        .def_property_readonly("token_eos", [](py_model & self) { return self.get().token_eos(); })
        .def_property_readonly("add_bos", [](py_model & self) { return self.get().add_bos(); })
        .def_property_readonly("n_vocab", [](py_model & self) { return self.get().n_vocab(); })
        // decode
        .def("decode", &decode, py::arg("tokens"), py::arg("pos"), py::arg("seq"), py::arg("want"),
             "Evaluates a batch; returns the logits of the rows with want != 0 as float32 [n_wanted, n_vocab].")
        .def("set_abort", [](py_model & self, bool on) { self.get().set_abort(on); }, py::arg("on"),
             "While on, a decode in progress (and any later one) stops within a graph node and raises.")
        .def("memory_truncate", [](py_model & self, int32_t seq, int32_t pos0) { self.get().memory_truncate(seq, pos0); },
             py::arg("seq"), py::arg("pos0"))
        .def("memory_clear", [](py_model & self) { self.get().memory_clear(); })
        // expert offload
        .def_property_readonly("offload_enabled", [](py_model & self) { return self.get().offload_enabled(); })
        .def("offload_stats", [](py_model & self) { return offload_stats_to_py(self.get().get_offload_stats()); })
        .def("offload_reset_stats", [](py_model & self) { self.get().offload_reset_stats(); })
        // chat template
        .def("chat_template", [](py_model & self) { return self.get().chat_template(); })
        .def(
            "apply_chat_template",
            [](py_model & self, const std::vector<std::pair<std::string, std::string>> & messages,
               const std::string & tmpl, bool add_assistant) {
                std::vector<pymoe::chat_message> msgs;
                for (const auto & [role, content] : messages) {
                    msgs.push_back({ role, content });
                }
                return self.get().apply_chat_template(tmpl, msgs, add_assistant);
            },
            py::arg("messages"), py::arg("template") = "", py::arg("add_assistant") = true)
        // metadata
        .def("metadata", [](py_model & self) { return self.get().metadata(); })
        .def_property_readonly("description", [](py_model & self) { return self.get().description(); })
        .def_property_readonly("n_ctx", [](py_model & self) { return self.get().n_ctx(); })
        .def_property_readonly("n_ctx_train", [](py_model & self) { return self.get().n_ctx_train(); })
        .def_property_readonly("n_batch", [](py_model & self) { return self.get().n_batch(); })
        .def_property_readonly("n_seq_max", [](py_model & self) { return self.get().n_seq_max(); })
        .def_property_readonly("n_layer", [](py_model & self) { return self.get().n_layer(); })
        .def_property_readonly("n_embd", [](py_model & self) { return self.get().n_embd(); })
        .def_property_readonly("size_bytes", [](py_model & self) { return self.get().size_bytes(); })
        .def_property_readonly("n_params", [](py_model & self) { return self.get().n_params(); })
        .def_property("n_threads", [](py_model & self) { return self.get().n_threads(); },
                      [](py_model & self, int32_t n) { self.get().set_n_threads(n); });

    py::class_<pymoe::sampler>(mod, "Sampler")
        .def(py::init([](int32_t n_vocab, float temperature, int32_t top_k, float top_p, float min_p,
                         float repeat_penalty, int32_t repeat_last_n, uint32_t seed) {
                 pymoe::sampler_params p;
                 p.temperature    = temperature;
                 p.top_k          = top_k;
                 p.top_p          = top_p;
                 p.min_p          = min_p;
                 p.repeat_penalty = repeat_penalty;
                 p.repeat_last_n  = repeat_last_n;
                 p.seed           = seed;
                 return std::make_unique<pymoe::sampler>(p, n_vocab);
             }),
             py::arg("n_vocab"), py::arg("temperature") = 0.8f, py::arg("top_k") = 40, py::arg("top_p") = 0.95f,
             py::arg("min_p") = 0.05f, py::arg("repeat_penalty") = 1.0f, py::arg("repeat_last_n") = 64,
             py::arg("seed") = LLAMA_DEFAULT_SEED)
        .def(
            "sample", [](pymoe::sampler & self, py_model & m, int32_t idx) { return self.sample(m.get(), idx); },
            py::arg("model"), py::arg("idx") = -1,
            "Samples from output row `idx` of the model's last decode and records the token.")
        .def(
            "sample_logits",
            [](pymoe::sampler & self, const f32_array & logits) {
                if (logits.ndim() != 1) {
                    throw std::invalid_argument("sample_logits: expected a 1-D float32 array");
                }
                return self.sample_logits(logits.data(), (int32_t) logits.size());
            },
            py::arg("logits"))
        .def("accept", &pymoe::sampler::accept, py::arg("token"))
        .def("reset", &pymoe::sampler::reset);
}

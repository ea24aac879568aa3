// pymoe core: the one header that the bindings and the native tests include.
//
// One concern per source file:
//   pymoe-log.cpp      llama.cpp/ggml log routing, recent errors for exception messages
//   pymoe-gguf.cpp     reading a GGUF's metadata and tensor table without loading it
//   pymoe-validate.cpp what a GGUF's metadata and tensor types could make llama.cpp abort on
//   pymoe-model.cpp    a loaded model and its context: vocab, decode, logits, chat template
//   pymoe-devices.cpp  ggml's devices: the list, RPC servers (connect, serve), which layer runs where
//   pymoe-sampler.cpp  llama.cpp's sampler chain
//   pymoe-quant.cpp    ggml's quantisers and dequantisers over threads
//   pymoe-platform.*   the OS: uncached reads, page-cache and mapping advice, available memory
//                      (the only file that calls it for these; included by the engine files)
//
// The expert-offload engine (internal headers, included by the engine files only):
//   pymoe-expert-store.*  where each expert's bytes live (file offsets, mapped host tensors) and reading them
//   pymoe-policy.*        eviction policies: LRU, LFU, LRFU, multidim, markov, static hot set, Belady (pure)
//   pymoe-expert-cache.*  slot pools in the fast tier, the (layer, expert) -> slot map, a byte budget
//   pymoe-planner.*       the per-layer plan: hit / load into a slot / run from the model's tensors (pure)
//   pymoe-step.*          one MoE layer's step: the planner, background admission and skipping, shared
//                         by the engine and the simulator
//   pymoe-loader.*        the background loader: reads and device uploads off the critical path, with events
//   pymoe-stream.*        disk tier: the direct branch's experts read ahead of the CPU into a ring (patch 0007)
//   pymoe-calibrate.cpp   the engine's cost model measured at its first sync point (link, disk, CPU, device)
//   pymoe-prefetch.*      predicting the next layers' experts, background loads, what predictions got right
//   pymoe-engine.*        ties them together per MoE layer at the router's sync point; stats
//   pymoe-hook.cpp        the llama_moe_hook that builds the expert branches (the only file with llama internals)
//   pymoe-simulator.*     routing traces through the same cache, policies and planner, with a modelled link
//   pymoe-recorder.*      recording a run's routing (and the predictor's guesses) for the simulator
//
// Errors are thrown as std::runtime_error / std::invalid_argument with a message
// that names the object and ends with what the user can do ("hint: ...").
#pragma once

#include <atomic>
#include <cstdint>
#include <map>
#include <memory>
#include <string>
#include <variant>
#include <vector>

struct ggml_backend_device;
struct llama_model;
struct llama_context;
struct llama_sampler;
struct llama_vocab;

namespace pymoe {

//
// log
//

// Forward llama.cpp and ggml log lines of at least `min_level` (ggml_log_level)
// to stderr; errors are always kept for exception messages.
void log_set_level(int min_level);
int  log_get_level();
// The error lines logged since the last call to log_clear_errors(), joined.
std::string log_take_errors();
void        log_clear_errors();

// llama.cpp's own build (the pinned upstream commit) and system info (its
// feature line, then the CPU's extra buffer types).
std::string llama_commit();
std::string system_info();
// The CPU device's extra buffer types: where llama.cpp may repack weights for
// faster kernels ("CPU_REPACK"; "AMX" only in a build with PYMOE_CPU_AMX=ON).
std::vector<std::string> cpu_extra_buffer_types();
// Whether this build allowed ggml's AMX repacking (cmake/pymoe-cpu-amx.cmake).
bool build_cpu_amx();

//
// platform (pymoe-platform.cpp: the only file that calls the OS for files, mappings and memory)
//

// What this OS lets the disk tier do; where a flag is false the engine cannot
// do it there, and the bytes it would have freed are not freed.
struct platform_caps {
    std::string os;                        // "linux", "macos", "windows"
    bool        uncached_reads    = false; // slot loads bypass the OS cache (O_DIRECT, F_NOCACHE,
                                           // FILE_FLAG_NO_BUFFERING); for a path: its file system allows it
    bool        drop_file_cache   = false; // a file range can be dropped from the OS cache (posix_fadvise)
    bool        mapping_will_need = false; // the direct branch's pages can be read ahead
    bool        mapping_release   = false; // the direct branch's pages leave the process after use
    bool        memory_limit      = false; // available_memory() honours a container limit (cgroups)
    std::string available_memory;          // how available_memory() measures
};

// The OS's capabilities; with `path`, uncached_reads says whether that file's
// file system allows them (tmpfs does not). Throws when `path` cannot be opened.
platform_caps platform_capabilities(const std::string & path = "");

// Bytes this process may still use: the OS's available memory, capped by a
// cgroup limit on Linux (see platform_caps::available_memory).
uint64_t available_memory();

// Reads [offset, offset + size) of `path` through the platform layer, as an
// expert store does (uncached: the uncached path with its aligned span). For tests.
std::string platform_read(const std::string & path, uint64_t offset, uint64_t size, bool uncached);

// I/O fault injection for tests, process-wide: read requests number `nth` ..
// nth + count - 1 after this call (1 = the next one) fail. A request is one
// read of the platform layer (every expert store reads through it; one slot
// load is a request per projection and 8 MiB). Kinds: "eio" (fails with EIO),
// "short" (fewer bytes, then the file looks shorter: an error), "eintr" (the
// first OS call is interrupted; retried, so invisible), "partial" (the first
// OS call returns fewer bytes; the rest is read, so invisible).
void io_fault_set(const std::string & kind, int64_t nth, int64_t count);
void io_fault_clear();

//
// gguf inspection (no weights are read)
//

// A scalar value or a short array; longer arrays are summarised by type and count.
using gguf_scalar = std::variant<int64_t, uint64_t, double, bool, std::string>;

struct gguf_value {
    std::string              type;      // gguf type name: "u32", "f32", "str", "arr" ...
    gguf_scalar              scalar;    // for non-arrays
    std::string              arr_type;  // element type for arrays
    uint64_t                 arr_n = 0; // element count for arrays
    std::vector<gguf_scalar> arr;       // elements, when arr_n <= max_array
};

struct gguf_tensor_info {
    std::string          name;
    std::string          type;    // ggml type name: "q4_K", "f32" ...
    int32_t              type_id; // enum ggml_type
    std::vector<int64_t> shape;   // ne[0..n_dims), ggml order (fastest first)
    uint64_t             nbytes;
    uint64_t             offset;  // absolute byte offset of the data in the file
};

struct gguf_info {
    uint32_t                                      version;
    uint64_t                                      alignment;
    uint64_t                                      data_offset;
    uint64_t                                      file_size;
    std::vector<std::pair<std::string, gguf_value>> kv;
    std::vector<gguf_tensor_info>                 tensors;
};

// Reads the header of a GGUF file. Throws std::runtime_error on a file that is
// not a valid GGUF or whose tensor data lies beyond the end of the file.
gguf_info gguf_read_info(const std::string & path, uint64_t max_array = 64);

// The architecture and the counts the expert engine sizes itself by, from the
// header's `ARCH.block_count` / `ARCH.expert_count` (any integer type; 0 when absent).
struct gguf_moe_counts {
    std::string arch;
    int64_t     n_layer  = 0;
    int64_t     n_expert = 0;
};
gguf_moe_counts gguf_read_moe_counts(const gguf_info & info);

//
// gguf validation (before llama.cpp sees a file)
//

// What in a GGUF would make llama.cpp abort the process (a GGML_ASSERT in its
// loader, vocabulary or graph build) or crash the first decode (a weight type
// the CPU kernels reading it do not handle) instead of failing to load: one
// message per problem, naming the key or tensor; empty when none is found.
// A pymoe sidecar gets the tensor-type checks only. Throws like gguf_read_info
// for a file that is not a complete GGUF.
std::vector<std::string> gguf_problems(const std::string & path);
// Throws std::runtime_error naming the problems (with a hint) when there are any.
void                     gguf_validate(const std::string & path);
// gguf_validate, then llama.cpp's loader as a dry run: hyperparameters,
// vocabulary and every tensor's name, shape and type checked, no weight read
// or allocated (the data may be a hole in a sparse file: `pymoe convert`
// checks its header before it writes the weights). Throws with llama.cpp's reason.
void                     gguf_check_loadable(const std::string & path);

//
// ggml types and quantisation
//

struct type_info {
    std::string name;
    int32_t     id;           // enum ggml_type
    int64_t     block_size;   // values per block
    uint64_t    type_size;    // bytes per block
    bool        quantized;
    bool        can_quantize; // quantize_rows accepts it (no importance matrix needed)
    bool        can_dequantize;
};

// enum ggml_type of a type name ("q4_K"); throws std::invalid_argument for an unknown name
int32_t                  ggml_type_from_name(const std::string & name);
type_info                ggml_type_describe(const std::string & name);
std::vector<std::string> quant_type_names();
uint64_t                 quant_row_size(const std::string & type, int64_t n_per_row);

// src [n_rows, n_per_row] float32 -> dst, n_rows * quant_row_size(type, n_per_row) bytes.
// n_threads <= 0: all hardware threads.
void quantize_rows(const std::string & type, const float * src, int64_t n_rows, int64_t n_per_row, void * dst,
                   int n_threads);
// the inverse: dst [n_rows, n_per_row] float32
void dequantize_rows(const std::string & type, const void * src, int64_t n_rows, int64_t n_per_row, float * dst,
                     int n_threads);

//
// expert offload
//

struct offload_params {
    bool                enabled    = false;
    // "disk": llama.cpp maps the experts without reading them; slots are read
    //         from the file and the direct branch's pages are dropped after use
    //         (the model may be larger than RAM).
    // "host": the experts are resident in host memory (llama.cpp loads them,
    //         unrepacked); slots are copied from there and the direct branch is
    //         the CPU computing where the weights are. With a GPU fast tier this
    //         is the GPU deployment; on a CPU-only build it runs the same data
    //         flow with the slots in RAM.
    std::string         tier       = "disk";
    uint64_t            budget     = 0;      // bytes of fast memory for expert slots (all pools together)
    std::string         policy     = "lru";  // eviction: "lru", "lfu", "lrfu", "multidim", "static" (hot set from
                                             // `profile`); not "belady" (offline: pymoe simulate only)
    bool                per_layer  = true;   // a slot pool per layer (each keeps its share of the budget) or
                                             // one per format shared by the layers: with a shared pool and
                                             // fewer slots than one token's experts, LRU evicts what the
                                             // next token wants first (layers run in order) and hits ~0
    double              w_recency   = 1.0;   // "multidim": weights of its score
    double              w_frequency = 1.0;
    double              w_precision = 1.0;
    std::vector<double> profile;             // "static": usage per expert, [n_layer * n_expert], layer-major
    bool                cpu_assist = true;   // a miss may be computed where its weights are, when the cost
                                             // model says that is cheaper than loading it (Fiddler); off:
                                             // every miss takes a slot while slots remain
    bool                direct_io  = true;   // O_DIRECT for slot loads, falls back to buffered reads
    int32_t             io_threads = 4;      // parallel reads when a layer misses several experts
    bool                stream     = true;   // disk tier: the direct branch's experts are read from the file
                                             // (uncached, in the order the CPU computes them) into a ring of
                                             // buffers instead of faulted in through the mapping (pymoe-stream.h)
    // Mixed precision (HOBBIT): a sidecar GGUF with a low-precision copy of every
    // expert. `lo_share` of the budget holds low-precision slots; a pair whose
    // gate weight is below `lo_threshold` may be served by such a slot.
    std::string         lo_path;
    double              lo_share     = 0.25;
    float               lo_threshold = 0.2f;  // relative to the token's top-k sum; 0: never low precision
                                              // (docs/quality.md measured the default on q2_K sidecars)
    // Prefetching: after layer L's router, predict layers L+1 .. L+depth with
    // their own routers applied to layer L's hidden state and load the
    // predicted experts in the background (depth > 1 only when the loader is idle).
    bool                prefetch            = false;
    int32_t             prefetch_depth      = 1;
    int32_t             prefetch_max_tokens = 4;  // larger ubatches (prefill) are not predicted
    // Background admission, for slots in device memory (a GPU, an RPC device):
    // a miss computed on the CPU is also uploaded into the cache while the link
    // is idle (at most one token's worth of uploads queued), into a free slot or
    // in place of an expert used less recently-and-often; a hit once it landed.
    bool                admission           = true;
    // Adaptive top-k: a missed expert (in no fast slot) whose gate weight,
    // relative to its token's top-k sum, is below `skip_threshold` for every
    // token of the step is skipped: neither loaded nor computed, its pairs
    // contribute nothing. 0: never (exact). With `skip_renormalize` the kept
    // pairs' weights are scaled back up to the token's full top-k sum.
    float               skip_threshold      = 0.0f;
    bool                skip_renormalize    = false;
    // Benchmark mode, never on by default: the experts of every (token, layer)
    // come from a recorded trace instead of the router, so a model with random
    // weights sees a real model's access pattern. [rows, n_layer, n_expert_used],
    // row-major; replayed in order, wrapping around.
    std::vector<int32_t> replay;
    std::vector<float>   replay_weights;  // the trace's gate weights, same shape (empty: the router's)
    // Record the routing to this file (empty: no recording): per step and MoE
    // layer the chosen experts, their gate weights and the prefetcher's guesses
    // (pymoe-recorder.h; pymoe simulate replays it)
    std::string          record_path;
};

// The engine's per-layer counters: one table (as ggml keeps its op names).
// The struct, its accumulation, the Python dicts (bindings.cpp) and the totals
// of pymoe.stats are all generated from it; a counter added here appears
// everywhere. X(type, name, meaning)
#define PYMOE_LAYER_COUNTERS(X)                                                                      \
    X(uint64_t, steps, "ubatches that went through this MoE layer")                                  \
    X(uint64_t, pairs, "(token, chosen expert) pairs")                                               \
    X(uint64_t, hits, "distinct experts of a step found in a slot")                                  \
    X(uint64_t, misses, "distinct experts of a step not in a slot")                                  \
    X(uint64_t, loads, "experts read into a slot")                                                   \
    X(uint64_t, direct, "distinct experts computed from the model's own tensors")                    \
    X(uint64_t, evictions, "experts that lost their slot")                                           \
    X(uint64_t, pool_pairs, "pairs computed from slots")                                             \
    X(uint64_t, direct_pairs, "pairs computed from the model's tensors")                             \
    X(uint64_t, bytes_loaded, "bytes read into slots")                                               \
    X(uint64_t, bytes_direct, "expert bytes the direct branch touched")                              \
    X(double, load_seconds, "reading into slots while the decode waited")                            \
    X(double, plan_seconds, "planning and bookkeeping at the sync point")                            \
    X(uint64_t, hits_lo, "distinct experts of a step served by a low-precision slot")                \
    X(uint64_t, loads_lo, "low-precision copies read into a slot")                                   \
    X(uint64_t, lo_pairs, "pairs computed in low precision")                                         \
    X(uint64_t, upgrades, "experts moved from a low- to a high-precision slot")                      \
    X(uint64_t, bytes_loaded_lo, "bytes of low-precision copies read into slots")                    \
    X(uint64_t, prefetch_predicted, "distinct experts predicted for this layer")                     \
    X(uint64_t, prefetch_correct, "predicted and chosen")                                            \
    X(uint64_t, prefetch_missed, "chosen but not predicted")                                         \
    X(uint64_t, prefetch_loads, "predicted experts loaded in the background")                        \
    X(uint64_t, prefetch_bytes, "bytes of those background loads")                                  \
    X(double, prefetch_wait_seconds, "the decode waited for a background load: exposed time")           \
    X(uint64_t, admissions, "missed experts uploaded into a slot in the background (hits once landed)") \
    X(uint64_t, bytes_admitted, "bytes of those background uploads")                                 \
    X(double, record_seconds, "recording the routing (--record-routing), its weight reads included")  \
    X(uint64_t, skipped, "missed experts left out: gate weight below skip_threshold (adaptive top-k)") \
    X(uint64_t, skipped_pairs, "the pairs of those experts: they contributed nothing")              \
    X(uint64_t, bytes_streamed, "direct-branch bytes read from the file into the stream's buffers")    \
    X(double, stream_wait_seconds, "the CPU waited for a streamed expert's bytes")                     \
    X(uint64_t, stream_fallbacks, "direct projections computed from the mapping instead of the stream")

struct layer_stats {
#define PYMOE_COUNTER_FIELD(type, name, doc) type name = 0;
    PYMOE_LAYER_COUNTERS(PYMOE_COUNTER_FIELD)
#undef PYMOE_COUNTER_FIELD

    layer_stats & operator+=(const layer_stats & o) {
#define PYMOE_COUNTER_ADD(type, name, doc) name += o.name;
        PYMOE_LAYER_COUNTERS(PYMOE_COUNTER_ADD)
#undef PYMOE_COUNTER_ADD
        return *this;
    }
};
// every field comes from the table (all are 8 bytes): a field added outside it fails here
#define PYMOE_COUNTER_SIZE(type, name, doc) +sizeof(type)
static_assert(sizeof(layer_stats) == 0 PYMOE_LAYER_COUNTERS(PYMOE_COUNTER_SIZE), "layer_stats: add counters to PYMOE_LAYER_COUNTERS");
#undef PYMOE_COUNTER_SIZE

struct offload_stats {
    std::string              tier;           // "disk" or "host" (see offload_params)
    uint64_t                 budget     = 0; // asked for
    uint64_t                 pool_bytes = 0; // allocated for slots (<= budget)
    int32_t                  n_slots    = 0; // all pools
    int32_t                  n_layer    = 0;
    int32_t                  n_expert   = 0;
    std::string              policy;
    double                   read_bandwidth = 0; // bytes/s of slot loads (disk, or host-to-device link), measured at start-up
    double                   direct_bandwidth  = 0; // bytes/s the direct branch streams an expert (the CPU, or the disk)
    double                   cpu_flops         = 0; // FLOP/s of the CPU's expert matmuls (a batch of 32)
    double                   device_flops      = 0; // FLOP/s of the device's expert matmuls (one token)
    int32_t                  offload_min_batch = 0; // ubatches this large run the direct branch on the device (op_offload)
    double                   token_seconds     = 0; // a decode token, measured (background admission's horizon)
    std::vector<std::pair<std::string, uint64_t>> pools_by_buffer; // bytes of slots per buffer type (device)
    // memory the engine uses beside its slots (not in the budget)
    uint64_t                 ids_bytes         = 0; // the plan's id tensors, all devices and host
    uint64_t                 bounce_bytes      = 0; // read buffers of the io threads, at most
    uint64_t                 router_copy_bytes = 0; // the predictor's float copies of routers it cannot read in place
    uint64_t                 pool_bytes_lo  = 0; // low-precision slots
    int32_t                  n_slots_lo     = 0;
    float                    lo_threshold   = 0;
    bool                     prefetch       = false;
    double                   prefetch_busy_seconds = 0; // the background loader's time: hidden + exposed
    std::vector<layer_stats> layers;             // by layer index; dense layers stay zero
    std::vector<uint64_t>    expert_pairs;       // [n_layer * n_expert] pairs routed to each expert
};

// How a budget splits over the slot pools of a model (nothing is allocated):
// layers whose experts share a format share a pool.
struct pool_plan {
    std::vector<int32_t> layers;
    uint64_t             slot_bytes = 0;  // one expert, all its projections
    int32_t              n_slots    = 0;
    int32_t              n_experts  = 0;  // the pool's layers x experts per layer
};

std::vector<pool_plan> offload_plan(const std::string & path, uint64_t budget, uint64_t * planned_bytes,
                                    bool per_layer = true);

// Reads expert `e` of layer `il` of the model at `path` as a slot load reads
// it (direct_io: uncached), and returns each projection's bytes in the order
// gate, up, down (or gate_up, down). For tests of the read path.
std::vector<std::string> expert_read(const std::string & path, int32_t il, int32_t e, bool direct_io);

// Bytes of the disk tier's stream ring for the model at `path` (what the engine allocates).
uint64_t stream_ring_bytes(const std::string & path);

// Tests of the stream's ordering: for each layer of `layers` in turn (one stream
// throughout, as the engine keeps one), the stream is told the layer's experts,
// then asked for (projection index, expert) pairs in the given order as the
// CPU asks, and released. Returns what each ask got: the projection's bytes,
// or "" where the CPU would compute from the mapping; and the fallbacks counted.
struct stream_probe_layer {
    int32_t                                   il = 0;
    std::vector<int32_t>                      experts;
    std::vector<std::pair<int32_t, int32_t>>  asks;
};
std::pair<std::vector<std::string>, uint64_t> stream_probe(const std::string & path,
                                                          const std::vector<stream_probe_layer> & layers);

//
// devices
//

struct device_info {
    std::string name;         // "CUDA0", "RPC0" ...
    std::string description;
    std::string type;         // "gpu", "igpu", "accel", "cpu"
    uint64_t    free  = 0;    // bytes of device memory
    uint64_t    total = 0;
    std::string endpoint;     // an RPC device's server, else empty
    bool        host_buffer = false;  // has a pinned host buffer type (uploads at full link speed)
};

// The devices this build can use (local backends, and RPC servers already connected).
std::vector<device_info> list_devices();

// Connects to ggml RPC servers (once per endpoint and process: ggml's device
// registry is process-wide) and returns their devices. Throws a clear error
// when a server cannot be reached (ggml's client would abort the process).
std::vector<ggml_backend_device *> rpc_devices(const std::vector<std::string> & endpoints);
bool                               is_rpc_device(ggml_backend_device * dev);
// A GPU of this machine (CUDA, Metal ...), not counting RPC devices.
bool has_local_gpu();

// Serves this build's (patched) CPU backend as a ggml RPC device on host:port;
// blocks while it serves (one client at a time), throws when it cannot listen.
void rpc_serve(const std::string & host, int32_t port, int32_t n_threads);

//
// model
//

class engine;  // pymoe-engine.h

// The context length a model gets when none is asked for: min(trained context, 4096).
int32_t default_n_ctx(int32_t n_ctx_train);

// Everything that decides how a model is loaded and its experts served. The
// defaults here are the only ones: Python binds this struct (pymoe.Settings
// reads them) and the CLI's flags come from those settings.
struct model_params {
    std::string path;
    int32_t     n_ctx        = 0;    // 0 = default_n_ctx(trained context)
    int32_t     n_batch      = 512;  // tokens per llama_decode call
    int32_t     n_ubatch     = 512;  // tokens per graph evaluation
    int32_t     n_seq_max    = 1;    // parallel sequences (batched decode)
    int32_t     n_threads    = 0;    // 0 = all hardware threads
    int32_t     n_gpu_layers = -1;   // -1 = all layers on the GPU when there is one
    bool        use_mmap     = true;
    bool        flash_attn   = false;
    bool        repack       = true;  // llama.cpp may repack weights for its CPU kernels (never with offload)
    std::string cache_type   = "f16"; // KV cache element type (ggml type name: f32, f16, q8_0 ...)
    // ggml RPC servers (HOST:PORT) whose devices are used like GPUs: layers and
    // expert slots on them (pymoe rpc-server serves this build's CPU backend)
    std::vector<std::string> rpc;
    offload_params offload;              // the expert-offload engine (off by default)
};

struct chat_message {
    std::string role;
    std::string content;
};

class model {
  public:
    explicit model(const model_params & params);
    ~model();
    model(const model &)             = delete;
    model & operator=(const model &) = delete;

    // --- vocab
    std::vector<int32_t> tokenize(const std::string & text, bool add_special, bool parse_special) const;
    std::string          detokenize(const std::vector<int32_t> & tokens, bool remove_special, bool unparse_special) const;
    std::string          token_to_piece(int32_t token, bool special) const;  // raw bytes, may be a partial UTF-8 sequence
    bool                 token_is_eog(int32_t token) const;
    int32_t              token_bos() const;
    int32_t              token_eos() const;
    bool                 add_bos() const;
    int32_t              n_vocab() const;

    // --- decode
    // Evaluates a batch: token i goes to sequence seq[i] at position pos[i];
    // the logits of the rows with want[i] != 0 are written to `out`, in order
    // ([n_wanted, n_vocab], float32). Batches longer than n_batch are split.
    // Throws on failure (context full, aborted, backend error); the sequences'
    // memory is then left as it was before the call.
    void decode(const int32_t * tokens, const int32_t * pos, const int32_t * seq, const int8_t * want,
                int32_t n_tokens, float * out);
    // While set, a decode in progress (and any later one) stops after the graph
    // node it is computing on the CPU backend, else before its next n_batch
    // chunk, and throws; any thread may call it (Ctrl-C handling).
    void set_abort(bool on) { abort_.store(on, std::memory_order_relaxed); }
    // Drops the cached positions >= pos0 of sequence `seq` (-1: all sequences).
    void memory_truncate(int32_t seq, int32_t pos0);
    void memory_clear();

    // --- chat template
    // The model's own template (empty when it has none).
    std::string chat_template() const;
    // Formats `messages` with `tmpl` (the model's when empty) by llama.cpp's
    // template matcher. Throws std::invalid_argument when llama.cpp does not
    // know the template.
    std::string apply_chat_template(const std::string & tmpl, const std::vector<chat_message> & messages,
                                    bool add_assistant) const;

    // --- metadata
    std::map<std::string, std::string> metadata() const;
    std::string                        description() const;
    int32_t                            n_ctx() const;
    int32_t                            n_ctx_train() const;
    int32_t                            n_batch() const;
    int32_t                            n_seq_max() const;
    int32_t                            n_layer() const;
    int32_t                            n_embd() const;
    uint64_t                           size_bytes() const;
    uint64_t                           n_params() const;
    int32_t                            n_threads() const;
    void                               set_n_threads(int32_t n_threads);

    // --- expert offload
    bool          offload_enabled() const { return engine_ != nullptr; }
    offload_stats get_offload_stats() const;  // throws std::logic_error when offload is off
    void          offload_reset_stats();

    const model_params & params() const { return params_; }
    llama_model *        llama() const { return model_.get(); }
    llama_context *      context() const { return ctx_.get(); }

  private:
    struct llama_model_deleter {
        void operator()(llama_model * m) const;
    };
    struct llama_context_deleter {
        void operator()(llama_context * c) const;
    };

    // throws std::invalid_argument for an id outside the vocabulary
    void check_tokens(const int32_t * tokens, int32_t n) const;

    model_params                                          params_;
    std::unique_ptr<engine>                               engine_;  // declared before model_: freed after the context
    std::unique_ptr<llama_model, llama_model_deleter>     model_;
    std::unique_ptr<llama_context, llama_context_deleter> ctx_;
    const llama_vocab *                                   vocab_ = nullptr;
    std::atomic<bool>                                     abort_{ false };  // llama.cpp's abort callback reads it

    // one llama_batch's arrays, sized n_batch once (no per-call allocation)
    std::vector<int32_t>   batch_tok_;
    std::vector<int32_t>   batch_pos_;
    std::vector<int32_t>   batch_nseq_;
    std::vector<int32_t>   batch_seq_;
    std::vector<int32_t *> batch_seqp_;
    std::vector<int8_t>    batch_out_;
};

//
// sampling
//

struct sampler_params {
    float    temperature    = 0.8f;  // <= 0: greedy
    int32_t  top_k          = 40;    // <= 0: off
    float    top_p          = 0.95f; // >= 1: off
    float    min_p          = 0.05f; // <= 0: off
    float    repeat_penalty = 1.0f;  // 1: off
    int32_t  repeat_last_n  = 64;
    uint32_t seed           = 0xFFFFFFFF; // LLAMA_DEFAULT_SEED: random
};

// llama.cpp's sampler chain: penalties -> top-k -> top-p -> min-p -> temperature -> dist
// (or greedy when temperature <= 0).
class sampler {
  public:
    sampler(const sampler_params & params, int32_t n_vocab);
    ~sampler();
    sampler(const sampler &)             = delete;
    sampler & operator=(const sampler &) = delete;

    // Samples from the logits of output row `idx` of the last decode (-1: the last row)
    // and records the token in the chain's history (for the penalties).
    int32_t sample(model & m, int32_t idx);
    // Samples from a row of logits given by the caller.
    int32_t sample_logits(const float * logits, int32_t n_vocab);
    void    accept(int32_t token);
    void    reset();

    const sampler_params & params() const { return params_; }

  private:
    struct llama_sampler_deleter {
        void operator()(llama_sampler * s) const;
    };
    sampler_params                                        params_;
    std::unique_ptr<llama_sampler, llama_sampler_deleter> chain_;
};

}  // namespace pymoe

// The expert store: where each routed expert's bytes live, and reading them.
//
// Experts of one layer are stacked on the last axis of its expert tensors
// ([n_in, n_out, n_expert] per projection), so expert e of a projection is
// one contiguous byte range: in the GGUF file at offset + e * expert_bytes,
// and, once llama.cpp has mapped the tensor, at data + e * expert_bytes.
#pragma once

#include "pymoe-platform.h"
#include "pymoe.h"

#include <condition_variable>
#include <memory>
#include <cstddef>
#include <cstdint>
#include <deque>
#include <functional>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

struct ggml_tensor;

namespace pymoe {

enum proj_kind : int32_t {
    PROJ_GATE    = 0,
    PROJ_UP      = 1,
    PROJ_DOWN    = 2,
    PROJ_GATE_UP = 3,
    PROJ_COUNT   = 4,
};

const char * proj_kind_name(proj_kind k); // "gate", "up", "down", "gate_up"

// one projection of one MoE layer
struct expert_proj {
    proj_kind            kind;
    int32_t              type;           // enum ggml_type
    int64_t              ne[3];          // [n_in, n_out, n_expert]
    uint64_t             expert_bytes;   // bytes of one expert (nb[2])
    uint64_t             file_offset;    // absolute offset of expert 0 in the file
    const uint8_t *      host = nullptr; // llama.cpp's mapping of the tensor, once known
};

struct expert_layer {
    int32_t                  il = -1;
    std::vector<expert_proj> projs;        // in the order gate, up, down / gate_up, down
    uint64_t                 expert_bytes = 0; // all projections of one expert

    const expert_proj * find(proj_kind k) const;
};

// A fixed pool of threads for reads, so a layer that misses several experts,
// or one large expert, reads with several requests in flight.
class io_pool {
  public:
    explicit io_pool(int n_threads);
    ~io_pool();

    // runs every task, spread over the threads, and returns when all are done
    void run(std::vector<std::function<void(int worker)>> & tasks);

    int size() const { return (int) threads_.size(); }

    // a buffer of `bytes`, aligned for uncached reads, private to worker `worker` of this pool
    uint8_t * scratch(int worker, size_t bytes);

  private:
    void loop(int worker);

    std::vector<std::thread>                 threads_;
    std::mutex                               mutex_;
    std::condition_variable                  cv_work_;
    std::condition_variable                  cv_done_;
    std::deque<std::function<void(int)>>     queue_;
    size_t                                   pending_ = 0;
    bool                                     stop_    = false;
    std::vector<std::pair<aligned_buffer, size_t>> scratch_;  // per worker
};

// Where a read goes: host memory, or a tensor of a backend buffer (device).
struct read_dst {
    uint8_t *     host   = nullptr;
    ggml_tensor * tensor = nullptr; // when host is null: ggml_backend_tensor_set(tensor, ..., offset)
    uint64_t      offset = 0;
};

class expert_store {
  public:
    // Reads the GGUF header of `path` and finds every layer's routed-expert
    // tensors. Throws for a model whose experts pymoe cannot address.
    // from_host: slot loads copy from llama.cpp's host tensors instead of reading the file.
    expert_store(const std::string & path, int32_t n_layer, int32_t n_expert, bool direct_io, int io_threads,
                 bool from_host = false);
    // The same, its layer and expert counts read from the file, one io thread (tools and tests).
    expert_store(const std::string & path, bool direct_io);
    ~expert_store();

    const std::string & path() const { return path_; }
    int32_t             n_layer() const { return n_layer_; }
    int32_t             n_expert() const { return n_expert_; }
    // null for a layer without routed experts (dense, or not a MoE model)
    const expert_layer * layer(int32_t il) const;
    const std::vector<expert_layer> & layers() const { return layers_; }
    uint64_t            total_expert_bytes() const;

    // The hook tells where llama.cpp mapped a tensor (lazily mapped experts).
    void set_host(int32_t il, proj_kind kind, const uint8_t * data);

    // Reads expert `e` of layer `il`, projection by projection, into `dst[i]`
    // for projs[i]. Large ranges are split and read in parallel.
    // Returns the bytes read.
    uint64_t read_expert(int32_t il, int32_t e, const std::vector<read_dst> & dst);
    // Several experts at once (one io_pool run); jobs = (il, e, dst). `pool`:
    // whose threads read (the store's own by default; the prefetcher has its own).
    struct read_job {
        int32_t               il;
        int32_t               e;
        std::vector<read_dst> dst;
    };
    uint64_t read_experts(const std::vector<read_job> & jobs, io_pool * pool = nullptr);

    // The direct branch computes from llama.cpp's mapping: ask the kernel to
    // read the expert ahead, and afterwards drop its pages so that the
    // page cache does not grow past the budget.
    void advise_willneed(int32_t il, int32_t e) const;
    void release(int32_t il, int32_t e) const;

    // Reads [offset, offset + size) of the file, past the OS cache where it
    // can: the range's first byte lands at buf + offset % k_io_align (`buf`
    // k_io_align-aligned, with room for the aligned span around the range).
    // Throws as platform_file::read. The stream's reads.
    void read_aligned(uint64_t offset, uint64_t size, uint8_t * buf);

    // Bytes per second of slot loads, measured by reading up to `max_bytes`
    // of expert data the way loads read it.
    double measure_read_bandwidth(uint64_t max_bytes);

    // slot loads bypass the OS cache (the file system allows it)
    bool direct_io() const { return file_.uncached(); }
    bool from_host() const { return from_host_; }

  private:
    expert_store(const std::string & path, const gguf_moe_counts & counts, bool direct_io);
    void read_range(uint64_t file_offset, uint64_t size, const read_dst & dst, uint8_t * bounce);

    std::string               path_;
    int32_t                   n_layer_  = 0;
    int32_t                   n_expert_ = 0;
    std::vector<expert_layer> layers_;   // [n_layer]; il = -1 where the layer has no experts
    bool                      from_host_ = false;
    platform_file             file_;     // all reads and cache advice go through the platform layer
    io_pool                   io_;
};

}  // namespace pymoe

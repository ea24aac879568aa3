// The direct branch's experts, streamed from the file (disk tier).
//
// The experts a layer computes in place live in llama.cpp's lazy mapping of
// the model file. Faulting a prefill's worth of them in through the mapping
// under memory pressure ran at 0.2 GB/s on a disk that gives 1.4 GB/s to
// large uncached reads (docs/design.md). The stream reads them instead: at the
// layer's sync point the engine names the experts of the direct branch; the
// stream reads each projection's experts in the order the CPU computes them
// (projection by projection, experts ascending: as the file lays them out),
// with uncached reads of up to 8 MiB, several in flight, into a ring of
// buffers; the CPU's mul_mat_id asks for expert k's bytes (patch 0007,
// ggml_cpu_set_expert_source), waits until they are there, and computes from
// the buffer while k+1 and after are read. Resident memory is the ring only:
// the mapping and the page cache stay untouched.
//
// The order of the projections' matmuls is a property of the graph, learned
// from the first layer: if the CPU asks for a projection other than the one
// the stream reads, what was read ahead is dropped and the stream follows the
// CPU. Anything the stream does not hold (an expert it was not told about, a
// dropped or failed read) the CPU computes from the mapping, as without the
// stream, so logits never depend on it.
#pragma once

#include "pymoe-expert-store.h"
#include "pymoe-platform.h"

#include <condition_variable>
#include <cstdint>
#include <mutex>
#include <thread>
#include <utility>
#include <vector>

namespace pymoe {

// the engine's ring: 64 MiB, or 3 buffers where one expert's projection is larger
constexpr uint64_t k_stream_ring_bytes = 64ull << 20;

class expert_stream {
  public:
    // The ring holds at least 3 buffers of the largest projection of one
    // expert (plus alignment), more while they fit in `ring_bytes` (at most 16).
    // `io_threads` reads in flight at a time.
    expert_stream(expert_store & store, int io_threads, uint64_t ring_bytes);
    ~expert_stream();
    expert_stream(const expert_stream &)             = delete;
    expert_stream & operator=(const expert_stream &) = delete;

    // Starts reading layer il's direct experts (distinct); ends the previous layer's.
    void begin_layer(int32_t il, const std::vector<int32_t> & experts);

    // What the layer's streaming came to, and the end of it: reads not started
    // are dropped, reads in flight waited for.
    struct layer_result {
        int32_t  il           = -1;
        uint64_t bytes        = 0; // read into the ring
        uint64_t fallbacks    = 0; // projections of experts the CPU computed from the mapping instead
        double   wait_seconds = 0; // the CPU waited for bytes (summed over its threads / their count)
    };
    layer_result end_layer();

    // patch 0007's callbacks: expert e of the tensor whose data is `data`
    const void * acquire(const void * data, int64_t e);
    void         release(const void * data, int64_t e, int nth);

    uint64_t memory_bytes() const { return (uint64_t) n_buffers_ * buffer_bytes_; }
    // what the ring of a stream over `store` takes: (buffers, bytes of each)
    static std::pair<int, uint64_t> ring_layout(const expert_store & store, uint64_t ring_bytes);
    int      n_buffers() const { return n_buffers_; }

  private:
    enum item_state : int32_t { ITEM_QUEUED, ITEM_READING, ITEM_READY, ITEM_FAILED, ITEM_DROPPED, ITEM_DONE };
    struct item {
        int32_t         proj = 0;   // index into the layer's projs
        int32_t         e    = 0;
        item_state      state = ITEM_QUEUED;
        int32_t         buffer = -1;
        uint64_t        span_start = 0;   // aligned file offset at buffer[0]
        uint64_t        next_piece = 0;   // bytes of the aligned span handed to readers
        uint64_t        span_bytes = 0;
        int32_t         in_flight  = 0;
        int32_t         released   = 0;
        bool            acquired   = false;
        const uint8_t * data       = nullptr;  // the expert's first byte in the buffer
    };

    void reader_loop();
    // under mutex_: the next piece to read, or false
    bool next_piece(size_t & it, uint64_t & off, uint64_t & len, uint8_t *& dst);
    void free_buffer(item & it);        // under mutex_
    void drop(size_t from, size_t to);  // under mutex_: items [from, to) not acquired are not read
    // under mutex_: index into items_, -1 for an expert not named, -2 for another tensor; `proj` its projection
    int  find_item(const void * data, int64_t e, int32_t * proj = nullptr) const;
    layer_result finish_locked(std::unique_lock<std::mutex> & lock);  // end_layer's body

    expert_store &                  store_;
    int                             n_buffers_    = 0;
    uint64_t                        buffer_bytes_ = 0;
    aligned_buffer                  ring_;
    std::vector<int32_t>            free_;        // free buffer indices

    std::mutex                      mutex_;
    std::condition_variable         cv_read_;     // readers: work or stop
    std::condition_variable         cv_ready_;    // the CPU: an item became ready; end_layer: in flight done
    std::vector<std::thread>        readers_;
    bool                            stop_ = false;

    // the current layer's job
    int32_t                         il_ = -1;
    std::vector<const uint8_t *>    proj_data_;   // [proj] the mapping's address of each projection
    std::vector<item>               items_;       // in reading order
    std::vector<int32_t>            index_;       // [proj * n_expert + e] -> item, or -1
    size_t                          dispatch_ = 0; // first item not yet fully handed to readers
    size_t                          expected_ = 0; // first item no CPU thread has asked for yet
    int32_t                         in_flight_ = 0;
    layer_result                    result_;
    std::vector<int32_t>            order_;       // projections in the order the CPU computes them (learned)
    std::vector<int32_t>            seen_;        // this layer's projections, in the order asked for
    std::vector<int32_t>            sorted_;      // scratch of begin_layer
};

}  // namespace pymoe

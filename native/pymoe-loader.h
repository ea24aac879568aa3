// Background loads into expert slots, off the critical path: prefetching and
// background admission both go through one loader.
//
// One thread takes jobs in order. A slot in host memory (the disk tier's RAM
// pools, a CPU-only host tier) is filled through the loader's own io_pool, so
// foreground loads never queue behind it. A slot in device memory whose
// expert is resident in host memory (the GPU deployment) is uploaded on the
// loader's own backend instance of that device -- its own stream, so the copy
// overlaps the compute stream -- with ggml_backend_tensor_set_async, and the
// job completes when an event recorded after it has completed. A job's flag
// turns 1 when the bytes are in place, -1 when the load failed: the engine
// publishes the slot (a hit from then on) or frees it.
#pragma once

#include "pymoe-expert-cache.h"
#include "pymoe-expert-store.h"

#include "ggml-backend.h"

#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <deque>
#include <memory>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

namespace pymoe {

class async_loader {
  public:
    // 0 while queued or loading, 1 when the bytes are in place, -1 when the load failed
    using flag = std::shared_ptr<std::atomic<int>>;

    explicit async_loader(int io_threads);
    ~async_loader();  // finishes the job in progress, drops the queue

    // Slots in buffers of `buft` (device memory) are uploaded on `backend`, an
    // instance of that device owned by the caller, which must outlive the loader.
    void add_upload_backend(ggml_backend_buffer_type_t buft, ggml_backend_t backend);

    // queues a load of `bytes`
    flag submit(expert_store & store, expert_store::read_job job, uint64_t bytes);
    // blocks until `done` is no longer 0; returns the seconds waited
    double wait(const flag & done);
    bool   idle();
    // bytes queued or being loaded: what the link still has to move
    uint64_t pending_bytes() const { return pending_bytes_.load(); }

    uint64_t bytes() const { return bytes_.load(); }
    double   busy_seconds() const;

    // a failure of a background load, reported once
    std::string take_error();

  private:
    struct job {
        expert_store *         store;
        expert_store::read_job read;
        flag                   done;
        uint64_t               bytes;
    };
    struct uploader {
        ggml_backend_buffer_type_t buft;
        ggml_backend_t             backend;
        ggml_backend_event_t       event;  // null when the device has none: then the backend is synchronised
    };

    void             loop();
    void             load(job & j);
    const uploader * uploader_for(const ggml_tensor * t) const;

    io_pool                 io_;
    std::vector<uploader>   uploaders_;  // set up before the first job (engine start-up)
    std::mutex              mutex_;
    std::condition_variable cv_;
    std::condition_variable cv_done_;
    std::deque<job>         queue_;
    bool                    busy_ = false;
    bool                    stop_ = false;
    std::atomic<uint64_t>   pending_bytes_{ 0 };
    std::atomic<uint64_t>   bytes_{ 0 };
    std::atomic<uint64_t>   busy_ns_{ 0 };
    std::string             error_;
    std::thread             thread_;  // last: it starts running loop(), which uses every member above
};

// Slots being filled in the background: published (a hit from then on) when
// their load completes, freed when it fails or is cancelled.
class pending_slots {
  public:
    void add(expert_cache & cache, int32_t il, int32_t e, async_loader::flag done) {
        v_.push_back({ &cache, il, e, std::move(done) });
    }
    // publishes or frees the loads that have finished; never blocks
    void settle();
    // blocks until the loads of layer il's `experts` have finished, then settles;
    // returns the seconds waited
    double wait(async_loader & loader, int32_t il, const std::vector<int32_t> & experts);
    bool   empty() const { return v_.empty(); }

  private:
    struct entry {
        expert_cache *     cache;
        int32_t            il;
        int32_t            e;
        async_loader::flag done;
    };
    std::vector<entry> v_;
};

}  // namespace pymoe

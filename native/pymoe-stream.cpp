// The direct branch's experts, streamed from the file (see pymoe-stream.h).
#include "pymoe-stream.h"

#include "ggml-cpu.h"
#include "ggml.h"

#include <algorithm>
#include <atomic>
#include <chrono>
#include <shared_mutex>
#include <tuple>

namespace pymoe {

namespace {

constexpr uint64_t k_piece       = 8ull << 20;  // one read request, as slot loads read
constexpr int      k_min_buffers = 3;           // one computed, one read, one ahead
constexpr int      k_max_buffers = 16;

uint64_t align_down(uint64_t x) {
    return x / k_io_align * k_io_align;
}

uint64_t align_up(uint64_t x) {
    return (x + k_io_align - 1) / k_io_align * k_io_align;
}

// The streams the CPU backend's expert source asks. Attached and detached
// only while no graph computes (engine construction and destruction); a
// shared lock lets every compute thread ask at once.
std::shared_mutex           g_streams_mutex;
std::vector<expert_stream *> g_streams;
std::atomic<int>            g_n_streams{ 0 };
std::once_flag              g_source_once;

const void * source_acquire(void *, const ggml_tensor * src0, int64_t e) {
    if (g_n_streams.load(std::memory_order_acquire) == 0) {
        return nullptr;
    }
    std::shared_lock<std::shared_mutex> lock(g_streams_mutex);
    for (expert_stream * s : g_streams) {
        if (const void * p = s->acquire(src0->data, e)) {
            return p;
        }
    }
    return nullptr;
}

void source_release(void *, const ggml_tensor * src0, int64_t e, int nth) {
    if (g_n_streams.load(std::memory_order_acquire) == 0) {
        return;
    }
    std::shared_lock<std::shared_mutex> lock(g_streams_mutex);
    for (expert_stream * s : g_streams) {
        s->release(src0->data, e, nth);
    }
}

}  // namespace

static void stream_attach(expert_stream * s) {
    std::call_once(g_source_once, [] { ggml_cpu_set_expert_source(source_acquire, source_release, nullptr); });
    std::unique_lock<std::shared_mutex> lock(g_streams_mutex);
    g_streams.push_back(s);
    g_n_streams.store((int) g_streams.size(), std::memory_order_release);
}

static void stream_detach(expert_stream * s) {
    std::unique_lock<std::shared_mutex> lock(g_streams_mutex);
    g_streams.erase(std::remove(g_streams.begin(), g_streams.end(), s), g_streams.end());
    g_n_streams.store((int) g_streams.size(), std::memory_order_release);
}

std::pair<int, uint64_t> expert_stream::ring_layout(const expert_store & store, uint64_t ring_bytes) {
    uint64_t largest = 0;
    for (const auto & l : store.layers()) {
        for (const auto & p : l.projs) {
            largest = std::max(largest, p.expert_bytes);
        }
    }
    const uint64_t buffer = align_up(largest) + 2 * k_io_align;  // the aligned span around any expert's range
    const int      n = (int) std::clamp<uint64_t>(ring_bytes / buffer, k_min_buffers, k_max_buffers);
    return { n, buffer };
}

expert_stream::expert_stream(expert_store & store, int io_threads, uint64_t ring_bytes) : store_(store) {
    size_t n_proj = 0;
    for (const auto & l : store_.layers()) {
        n_proj = std::max(n_proj, l.projs.size());
    }
    std::tie(n_buffers_, buffer_bytes_) = ring_layout(store_, ring_bytes);
    ring_ = aligned_alloc_bytes((size_t) (buffer_bytes_ * (uint64_t) n_buffers_));
    for (int b = n_buffers_ - 1; b >= 0; --b) {
        free_.push_back(b);
    }
    for (size_t j = 0; j < n_proj; ++j) {
        order_.push_back((int32_t) j);
    }
    for (int i = 0; i < std::max(1, io_threads); ++i) {
        readers_.emplace_back([this] { reader_loop(); });
    }
    stream_attach(this);
}

expert_stream::~expert_stream() {
    stream_detach(this);  // waits until no compute thread is asking
    {
        std::unique_lock<std::mutex> lock(mutex_);
        finish_locked(lock);
        stop_ = true;
    }
    cv_read_.notify_all();
    for (auto & t : readers_) {
        t.join();
    }
}

void expert_stream::begin_layer(int32_t il, const std::vector<int32_t> & experts) {
    std::unique_lock<std::mutex> lock(mutex_);
    finish_locked(lock);
    const expert_layer * l = store_.layer(il);
    if (!l || experts.empty()) {
        return;
    }
    const int32_t n_proj = (int32_t) l->projs.size();
    proj_data_.assign((size_t) n_proj, nullptr);
    for (int32_t j = 0; j < n_proj; ++j) {
        if (!l->projs[(size_t) j].host) {
            return;  // not mapped (yet): the CPU computes from wherever llama.cpp put it
        }
        proj_data_[(size_t) j] = l->projs[(size_t) j].host;
    }
    if ((int32_t) order_.size() != n_proj) {
        order_.clear();
        for (int32_t j = 0; j < n_proj; ++j) {
            order_.push_back(j);
        }
    }
    sorted_.assign(experts.begin(), experts.end());
    std::sort(sorted_.begin(), sorted_.end());
    sorted_.erase(std::unique(sorted_.begin(), sorted_.end()), sorted_.end());
    const int32_t n_expert = store_.n_expert();
    index_.assign((size_t) n_proj * (size_t) n_expert, -1);
    items_.clear();
    for (int32_t j : order_) {
        for (int32_t e : sorted_) {
            if (e < 0 || e >= n_expert) {
                continue;
            }
            index_[(size_t) j * (size_t) n_expert + (size_t) e] = (int32_t) items_.size();
            item it;
            it.proj = j;
            it.e    = e;
            items_.push_back(it);
        }
    }
    il_        = il;
    dispatch_  = 0;
    expected_  = 0;
    result_    = layer_result{};
    result_.il = il;
    seen_.clear();
    lock.unlock();
    cv_read_.notify_all();
}

expert_stream::layer_result expert_stream::end_layer() {
    std::unique_lock<std::mutex> lock(mutex_);
    return finish_locked(lock);
}

expert_stream::layer_result expert_stream::finish_locked(std::unique_lock<std::mutex> & lock) {
    if (il_ < 0) {
        return layer_result{};
    }
    // the layer's matmuls are over: nothing is in use, reads not started are not needed
    for (auto & it : items_) {
        if (it.state == ITEM_QUEUED || it.state == ITEM_READING) {
            it.state = ITEM_DROPPED;
        }
    }
    cv_ready_.wait(lock, [this] { return in_flight_ == 0; });
    if ((int32_t) seen_.size() == (int32_t) order_.size()) {
        order_ = seen_;  // the graph's order of the projections' matmuls
    }
    items_.clear();
    index_.clear();
    proj_data_.clear();
    free_.clear();
    for (int b = n_buffers_ - 1; b >= 0; --b) {
        free_.push_back(b);
    }
    il_ = -1;
    const layer_result r = result_;
    result_              = layer_result{};
    return r;
}

int expert_stream::find_item(const void * data, int64_t e, int32_t * proj) const {
    for (size_t j = 0; j < proj_data_.size(); ++j) {
        if (proj_data_[j] == data) {
            if (proj) {
                *proj = (int32_t) j;
            }
            if (e < 0 || e >= store_.n_expert()) {
                return -1;
            }
            return index_[j * (size_t) store_.n_expert() + (size_t) e];
        }
    }
    return -2;  // not this layer's tensor
}

void expert_stream::free_buffer(item & it) {
    if (it.buffer >= 0) {
        free_.push_back(it.buffer);
        it.buffer = -1;
        cv_read_.notify_all();
    }
}

void expert_stream::drop(size_t from, size_t to) {
    const expert_layer * l = store_.layer(il_);
    for (size_t i = from; i < to && i < items_.size(); ++i) {
        item & it = items_[i];
        if (it.acquired || it.state == ITEM_DONE || it.state == ITEM_DROPPED) {
            continue;
        }
        it.state = ITEM_DROPPED;
        if (it.in_flight == 0) {
            free_buffer(it);
        }
        // the CPU will compute it from the mapping: have the OS read it ahead
        const expert_proj & p = l->projs[(size_t) it.proj];
        mapping_will_need(p.host + (uint64_t) it.e * p.expert_bytes, p.expert_bytes);
    }
}

const void * expert_stream::acquire(const void * data, int64_t e) {
    std::unique_lock<std::mutex> lock(mutex_);
    if (il_ < 0) {
        return nullptr;
    }
    int32_t   proj = -1;
    const int idx  = find_item(data, e, &proj);
    if (idx == -2) {
        return nullptr;
    }
    if (std::find(seen_.begin(), seen_.end(), proj) == seen_.end()) {
        seen_.push_back(proj);  // the CPU's order of the projections
    }
    if (idx < 0) {
        ++result_.fallbacks;  // an expert the engine did not name: the mapping has it
        return nullptr;
    }
    item &     it    = items_[(size_t) idx];
    const bool first = !it.acquired;
    if (first) {
        // the CPU asks in its order; anything before this that it skipped, it computes elsewhere
        if ((size_t) idx > expected_) {
            drop(expected_, (size_t) idx);
        }
        expected_   = std::max(expected_, (size_t) idx + 1);
        it.acquired = true;
    }
    const auto t0 = std::chrono::steady_clock::now();
    cv_ready_.wait(lock, [&] { return it.state != ITEM_QUEUED && it.state != ITEM_READING; });
    if (first) {
        result_.wait_seconds += std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
        if (it.state != ITEM_READY) {
            ++result_.fallbacks;
        }
    }
    return it.state == ITEM_READY ? it.data : nullptr;
}

void expert_stream::release(const void * data, int64_t e, int nth) {
    std::unique_lock<std::mutex> lock(mutex_);
    if (il_ < 0) {
        return;
    }
    const int idx = find_item(data, e);
    if (idx < 0) {
        return;
    }
    item & it = items_[(size_t) idx];
    if (it.state == ITEM_READY && ++it.released >= nth) {
        it.state = ITEM_DONE;
        free_buffer(it);
    }
}

bool expert_stream::next_piece(size_t & i, uint64_t & off, uint64_t & len, uint8_t *& dst) {
    if (il_ < 0) {
        return false;
    }
    const expert_layer * l = store_.layer(il_);
    while (dispatch_ < items_.size()) {
        item &              it = items_[dispatch_];
        const expert_proj & p  = l->projs[(size_t) it.proj];
        const uint64_t      b0 = p.file_offset + (uint64_t) it.e * p.expert_bytes;  // the expert's bytes
        const uint64_t      b1 = b0 + p.expert_bytes;
        if (it.state == ITEM_QUEUED) {
            if (free_.empty()) {
                return false;  // wait until the CPU is done with a buffer
            }
            it.buffer = free_.back();
            free_.pop_back();
            it.span_start = align_down(b0);
            it.span_bytes = align_up(b1) - it.span_start;
            it.next_piece = 0;
            it.data       = ring_.get() + (uint64_t) it.buffer * buffer_bytes_ + (b0 - it.span_start);
            it.state      = ITEM_READING;
        }
        if (it.state == ITEM_READING && it.next_piece < it.span_bytes) {
            // pieces of the aligned span; the first and last are cut to the expert's bytes
            const uint64_t s0 = it.span_start + it.next_piece;
            const uint64_t s1 = std::min(s0 + k_piece, it.span_start + it.span_bytes);
            off               = std::max(s0, b0);
            len               = std::min(s1, b1) - off;
            dst               = ring_.get() + (uint64_t) it.buffer * buffer_bytes_ + it.next_piece;
            it.next_piece     = s1 - it.span_start;
            i                 = dispatch_;
            return true;
        }
        ++dispatch_;
    }
    return false;
}

void expert_stream::reader_loop() {
    for (;;) {
        size_t                       i   = 0;
        uint64_t                     off = 0, len = 0;
        uint8_t *                    dst = nullptr;
        std::unique_lock<std::mutex> lock(mutex_);
        cv_read_.wait(lock, [&] { return stop_ || next_piece(i, off, len, dst); });
        if (stop_) {
            return;
        }
        ++items_[i].in_flight;
        ++in_flight_;
        lock.unlock();
        bool ok = true;
        try {
            store_.read_aligned(off, len, dst);
        } catch (...) {
            ok = false;  // the CPU computes this expert from the mapping
        }
        lock.lock();
        item & it = items_[i];
        --it.in_flight;
        --in_flight_;
        if (ok) {
            result_.bytes += len;
        } else if (it.state == ITEM_READING) {
            it.state = ITEM_FAILED;
        }
        if (it.state == ITEM_READING && it.in_flight == 0 && it.next_piece >= it.span_bytes) {
            it.state = ITEM_READY;
        }
        if ((it.state == ITEM_DROPPED || it.state == ITEM_FAILED) && it.in_flight == 0) {
            free_buffer(it);
        }
        cv_ready_.notify_all();
    }
}

uint64_t stream_ring_bytes(const std::string & path) {
    const expert_store store(path, false);
    const auto [n, bytes] = expert_stream::ring_layout(store, k_stream_ring_bytes);
    return (uint64_t) n * bytes;
}

std::pair<std::vector<std::string>, uint64_t> stream_probe(const std::string &                     path,
                                                          const std::vector<stream_probe_layer> & layers) {
    expert_store store(path, true);
    // stand-ins for llama.cpp's mapping: the stream only tells tensors apart by address
    std::vector<std::vector<uint8_t>> mapped;
    for (const auto & l : store.layers()) {
        for (const auto & p : l.projs) {
            mapped.emplace_back((size_t) (p.expert_bytes * (uint64_t) store.n_expert()));
            store.set_host(l.il, p.kind, mapped.back().data());
        }
    }
    std::vector<std::string> out;
    uint64_t                 fallbacks = 0;
    expert_stream            stream(store, 2, 0);  // the smallest ring: 3 buffers
    for (const auto & pl : layers) {
        const expert_layer * l = store.layer(pl.il);
        if (!l) {
            throw std::invalid_argument("stream_probe: layer " + std::to_string(pl.il) + " has no experts");
        }
        stream.begin_layer(pl.il, pl.experts);
        for (const auto & [j, e] : pl.asks) {
            if (j < 0 || j >= (int32_t) l->projs.size()) {
                throw std::invalid_argument("stream_probe: no projection " + std::to_string(j));
            }
            const expert_proj & p = l->projs[(size_t) j];
            const auto *        b = static_cast<const char *>(stream.acquire(p.host, e));
            out.emplace_back(b ? std::string(b, p.expert_bytes) : std::string());
            stream.release(p.host, e, 1);
        }
        fallbacks += stream.end_layer().fallbacks;
    }
    return { out, fallbacks };
}

}  // namespace pymoe

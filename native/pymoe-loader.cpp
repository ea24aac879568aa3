// Background loads into expert slots (see pymoe-loader.h).
#include "pymoe-loader.h"

#include "ggml.h"

#include <algorithm>
#include <chrono>
#include <stdexcept>

namespace pymoe {

namespace {

constexpr uint64_t k_upload_chunk = 8ull << 20;  // below ggml RPC's 10 MiB hash-cache threshold

}  // namespace

async_loader::async_loader(int io_threads) : io_(io_threads), thread_([this] { loop(); }) {}

async_loader::~async_loader() {
    {
        std::lock_guard<std::mutex> lock(mutex_);
        stop_ = true;
    }
    cv_.notify_all();
    thread_.join();
    for (auto & u : uploaders_) {
        if (u.event) {
            ggml_backend_event_free(u.event);
        }
    }
}

void async_loader::add_upload_backend(ggml_backend_buffer_type_t buft, ggml_backend_t backend) {
    ggml_backend_event_t event = ggml_backend_event_new(ggml_backend_get_device(backend));
    std::lock_guard<std::mutex> lock(mutex_);
    uploaders_.push_back({ buft, backend, event });
}

const async_loader::uploader * async_loader::uploader_for(const ggml_tensor * t) const {
    if (!t || !t->buffer) {
        return nullptr;
    }
    const ggml_backend_buffer_type_t buft = ggml_backend_buffer_get_type(t->buffer);
    for (const auto & u : uploaders_) {
        if (u.buft == buft) {
            return &u;
        }
    }
    return nullptr;
}

async_loader::flag async_loader::submit(expert_store & store, expert_store::read_job job, uint64_t bytes) {
    flag done = std::make_shared<std::atomic<int>>(0);
    pending_bytes_ += bytes;
    {
        std::lock_guard<std::mutex> lock(mutex_);
        queue_.push_back({ &store, std::move(job), done, bytes });
    }
    cv_.notify_all();
    return done;
}

double async_loader::wait(const flag & done) {
    if (done->load() != 0) {
        return 0.0;
    }
    const auto                   t0 = std::chrono::steady_clock::now();
    std::unique_lock<std::mutex> lock(mutex_);
    cv_done_.wait(lock, [&] { return done->load() != 0; });
    return std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
}

bool async_loader::idle() {
    std::lock_guard<std::mutex> lock(mutex_);
    return queue_.empty() && !busy_;
}

double async_loader::busy_seconds() const {
    return (double) busy_ns_.load() * 1e-9;
}

std::string async_loader::take_error() {
    std::lock_guard<std::mutex> lock(mutex_);
    std::string                 e;
    std::swap(e, error_);
    return e;
}

void async_loader::load(job & j) {
    const expert_layer * l = j.store->layer(j.read.il);
    if (!l || j.read.dst.size() != l->projs.size()) {
        throw std::logic_error("async_loader: bad job");
    }
    // a device slot of an expert resident in host memory: an upload on the
    // loader's own stream of that device, complete once its event is
    const uploader * up = j.store->from_host() ? uploader_for(j.read.dst[0].tensor) : nullptr;
    if (!up) {
        bytes_ += j.store->read_experts({ j.read }, &io_);  // the file, or a copy in host memory
        return;
    }
    for (size_t i = 0; i < l->projs.size(); ++i) {
        const expert_proj & p   = l->projs[i];
        const read_dst &    d   = j.read.dst[i];
        const uint8_t *     src = p.host ? p.host + (uint64_t) j.read.e * p.expert_bytes : nullptr;
        if (!src || !d.tensor || uploader_for(d.tensor) != up) {
            throw std::logic_error("async_loader: layer " + std::to_string(j.read.il) + " is not mapped yet");
        }
        for (uint64_t pos = 0; pos < p.expert_bytes; pos += k_upload_chunk) {
            const uint64_t n = std::min(k_upload_chunk, p.expert_bytes - pos);
            ggml_backend_tensor_set_async(up->backend, d.tensor, src + pos, d.offset + pos, n);
        }
    }
    if (up->event) {
        ggml_backend_event_record(up->event, up->backend);
        ggml_backend_event_synchronize(up->event);
    } else {
        ggml_backend_synchronize(up->backend);
    }
    bytes_ += l->expert_bytes;
}

void async_loader::loop() {
    for (;;) {
        job j;
        {
            std::unique_lock<std::mutex> lock(mutex_);
            cv_.wait(lock, [this] { return stop_ || !queue_.empty(); });
            if (stop_) {
                for (auto & q : queue_) {  // cancelled: the engine frees their slots
                    q.done->store(-1);
                    pending_bytes_ -= q.bytes;
                }
                queue_.clear();
                cv_done_.notify_all();
                return;
            }
            j = std::move(queue_.front());
            queue_.pop_front();
            busy_ = true;
        }
        const auto t0     = std::chrono::steady_clock::now();
        int        result = 1;
        try {
            load(j);
        } catch (const std::exception & ex) {
            result = -1;
            std::lock_guard<std::mutex> lock(mutex_);
            if (error_.empty()) {
                error_ = std::string("background load: ") + ex.what();
            }
        }
        busy_ns_ += (uint64_t) std::chrono::duration_cast<std::chrono::nanoseconds>(
                        std::chrono::steady_clock::now() - t0).count();
        pending_bytes_ -= j.bytes;
        {
            std::lock_guard<std::mutex> lock(mutex_);
            j.done->store(result);
            busy_ = false;
        }
        cv_done_.notify_all();
    }
}

void pending_slots::settle() {
    for (auto it = v_.begin(); it != v_.end();) {
        const int state = it->done->load();
        if (state == 0) {
            ++it;
            continue;
        }
        if (state > 0) {
            it->cache->publish(it->il, it->e);
        } else {
            it->cache->release(it->il, it->e);  // failed or cancelled: the slot holds nothing usable
        }
        it = v_.erase(it);
    }
}

double pending_slots::wait(async_loader & loader, int32_t il, const std::vector<int32_t> & experts) {
    double waited = 0.0;
    for (const auto & x : v_) {
        if (x.il == il && std::find(experts.begin(), experts.end(), x.e) != experts.end()) {
            waited += loader.wait(x.done);
        }
    }
    settle();
    return waited;
}

}  // namespace pymoe

// The expert store (see pymoe-expert-store.h).
#include "pymoe-expert-store.h"

#include "ggml-backend.h"
#include "ggml.h"

#include <algorithm>
#include <chrono>
#include <cstring>
#include <regex>
#include <stdexcept>

namespace pymoe {

namespace {

constexpr uint64_t k_chunk = 8ull << 20;      // one read request; bounds the bounce buffers
// The page cache of the file around a released expert that is dropped with it:
// more than the kernel's fault-around window (64 KiB by default).
constexpr uint64_t k_release_margin = 128 << 10;
// Our page-table entries around it that are dropped: a fault maps the whole
// large folio it hits (Linux >= 6.16 on ext4, earlier on xfs/btrfs; up to PMD
// size, 2 MiB), so an expert's read also maps its neighbours' pages. Unmapping
// a neighbour in use costs a minor fault; leaving it mapped keeps it resident.
constexpr uint64_t k_unmap_margin = 2ull << 20;

const char * k_proj_names[PROJ_COUNT] = { "gate", "up", "down", "gate_up" };

}  // namespace

const char * proj_kind_name(proj_kind k) {
    return k >= 0 && k < PROJ_COUNT ? k_proj_names[k] : "?";
}

const expert_proj * expert_layer::find(proj_kind k) const {
    for (const auto & p : projs) {
        if (p.kind == k) {
            return &p;
        }
    }
    return nullptr;
}

//
// io_pool
//

io_pool::io_pool(int n_threads) {
    scratch_.resize((size_t) std::max(1, n_threads));
    for (int i = 0; i < std::max(1, n_threads); ++i) {
        threads_.emplace_back([this, i] { loop(i); });
    }
}

io_pool::~io_pool() {
    {
        std::lock_guard<std::mutex> lock(mutex_);
        stop_ = true;
    }
    cv_work_.notify_all();
    for (auto & t : threads_) {
        t.join();
    }
}

uint8_t * io_pool::scratch(int worker, size_t bytes) {
    auto & [p, n] = scratch_[(size_t) worker];
    if (n < bytes) {
        p.reset();
        n = 0;
        p = aligned_alloc_bytes(bytes);
        n = bytes;
    }
    return p.get();
}

void io_pool::loop(int worker) {
    for (;;) {
        std::function<void(int)> task;
        {
            std::unique_lock<std::mutex> lock(mutex_);
            cv_work_.wait(lock, [this] { return stop_ || !queue_.empty(); });
            if (stop_ && queue_.empty()) {
                return;
            }
            task = std::move(queue_.front());
            queue_.pop_front();
        }
        task(worker);
        {
            std::lock_guard<std::mutex> lock(mutex_);
            if (--pending_ == 0) {
                cv_done_.notify_all();
            }
        }
    }
}

void io_pool::run(std::vector<std::function<void(int)>> & tasks) {
    if (tasks.empty()) {
        return;
    }
    std::vector<std::exception_ptr> errors(tasks.size());
    {
        std::lock_guard<std::mutex> lock(mutex_);
        for (size_t i = 0; i < tasks.size(); ++i) {
            queue_.emplace_back([&, i](int worker) {
                try {
                    tasks[i](worker);
                } catch (...) {
                    errors[i] = std::current_exception();
                }
            });
        }
        pending_ += tasks.size();
    }
    cv_work_.notify_all();
    {
        std::unique_lock<std::mutex> lock(mutex_);
        cv_done_.wait(lock, [this] { return pending_ == 0; });
    }
    for (auto & e : errors) {
        if (e) {
            std::rethrow_exception(e);
        }
    }
}

//
// expert_store
//

expert_store::expert_store(const std::string & path, int32_t n_layer, int32_t n_expert, bool direct_io,
                           int io_threads, bool from_host)
    : path_(path),
      n_layer_(n_layer),
      n_expert_(n_expert),
      from_host_(from_host),
      file_(path, direct_io),
      io_(io_threads) {
    const gguf_info info = gguf_read_info(path, 0);
    layers_.resize((size_t) std::max(n_layer, 0));
    static const std::regex re(R"(^blk\.(\d+)\.ffn_(gate|up|down|gate_up)_(ch)?exps\.weight$)");
    for (const auto & t : info.tensors) {
        std::smatch m;
        if (!std::regex_match(t.name, m, re)) {
            continue;  // not a routed expert weight; biases and scales stay with llama.cpp
        }
        if (m[3].matched) {
            throw std::runtime_error("'" + path + "': chunked expert tensors (" + t.name +
                                     ") are not supported by pymoe's offload yet; hint: run with offload off");
        }
        const int         il = std::stoi(m[1].str());
        const std::string k  = m[2].str();
        const proj_kind   pk = k == "gate" ? PROJ_GATE : k == "up" ? PROJ_UP : k == "down" ? PROJ_DOWN : PROJ_GATE_UP;
        if (il < 0 || il >= n_layer || t.shape.size() != 3 || t.shape[2] != n_expert) {
            throw std::runtime_error("'" + path + "': expert tensor " + t.name +
                                     " does not have the model's layer or expert count; hint: the file is not a "
                                     "model pymoe can offload");
        }
        expert_proj p;
        p.kind         = pk;
        p.type         = t.type_id;
        p.ne[0]        = t.shape[0];
        p.ne[1]        = t.shape[1];
        p.ne[2]        = t.shape[2];
        p.expert_bytes = t.nbytes / (uint64_t) n_expert;
        p.file_offset  = t.offset;
        layers_[il].il = il;
        layers_[il].projs.push_back(p);
    }
    for (auto & l : layers_) {
        std::sort(l.projs.begin(), l.projs.end(),
                  [](const expert_proj & a, const expert_proj & b) { return a.kind < b.kind; });
        l.expert_bytes = 0;
        for (const auto & p : l.projs) {
            l.expert_bytes += p.expert_bytes;
        }
        if (l.il >= 0 && !l.find(PROJ_DOWN)) {
            throw std::runtime_error("'" + path + "': layer " + std::to_string(l.il) +
                                     " has expert tensors but no ffn_down_exps; hint: the file is not a model pymoe "
                                     "can offload");
        }
    }
}

expert_store::expert_store(const std::string & path, bool direct_io)
    : expert_store(path, gguf_read_moe_counts(gguf_read_info(path, 0)), direct_io) {}

expert_store::expert_store(const std::string & path, const gguf_moe_counts & counts, bool direct_io)
    : expert_store(path, (int32_t) counts.n_layer, (int32_t) counts.n_expert, direct_io, 1) {}

expert_store::~expert_store() = default;

const expert_layer * expert_store::layer(int32_t il) const {
    if (il < 0 || il >= (int32_t) layers_.size() || layers_[il].il < 0) {
        return nullptr;
    }
    return &layers_[il];
}

uint64_t expert_store::total_expert_bytes() const {
    uint64_t total = 0;
    for (const auto & l : layers_) {
        total += l.expert_bytes * (uint64_t) n_expert_;
    }
    return total;
}

void expert_store::set_host(int32_t il, proj_kind kind, const uint8_t * data) {
    if (il < 0 || il >= (int32_t) layers_.size()) {
        return;
    }
    for (auto & p : layers_[il].projs) {
        if (p.kind == kind) {
            p.host = data;
        }
    }
}

void expert_store::read_range(uint64_t off, uint64_t size, const read_dst & dst, uint8_t * bounce) {
    if (!file_.uncached() && dst.host) {
        file_.read(off, size, dst.host);  // straight into the slot
        file_.drop_cache(off, size);      // the slot holds it now
        return;
    }
    const uint8_t * src = file_.read_uncached(off, size, bounce);
    if (dst.host) {
        memcpy(dst.host, src, size);
    } else if (dst.tensor) {
        ggml_backend_tensor_set(dst.tensor, src, dst.offset, size);
    }
}

void expert_store::read_aligned(uint64_t offset, uint64_t size, uint8_t * buf) {
    if (file_.uncached()) {
        file_.read_uncached(offset, size, buf);
        return;
    }
    file_.read(offset, size, buf + offset % k_io_align);
    file_.drop_cache(offset, size);
}

uint64_t expert_store::read_experts(const std::vector<read_job> & jobs, io_pool * pool) {
    io_pool &                             io = pool ? *pool : io_;
    std::vector<std::function<void(int)>> tasks;
    uint64_t                              total = 0;
    for (const auto & job : jobs) {
        const expert_layer * l = layer(job.il);
        if (!l || job.e < 0 || job.e >= n_expert_ || job.dst.size() != l->projs.size()) {
            throw std::logic_error("read_experts: bad job");
        }
        for (size_t i = 0; i < l->projs.size(); ++i) {
            const expert_proj & p    = l->projs[i];
            const uint64_t      base = p.file_offset + (uint64_t) job.e * p.expert_bytes;
            if (from_host_ && !p.host) {
                throw std::logic_error("expert_store: layer " + std::to_string(job.il) + " not mapped yet");
            }
            const uint8_t * src = from_host_ ? p.host + (uint64_t) job.e * p.expert_bytes : nullptr;
            for (uint64_t pos = 0; pos < p.expert_bytes; pos += k_chunk) {
                const uint64_t n = std::min(k_chunk, p.expert_bytes - pos);
                read_dst       d = job.dst[i];
                if (d.host) {
                    d.host += pos;
                } else {
                    d.offset += pos;
                }
                if (src) {  // host tier: a copy from the resident tensor
                    tasks.emplace_back([src, pos, n, d](int) {
                        if (d.host) {
                            memcpy(d.host, src + pos, n);
                        } else if (d.tensor) {
                            ggml_backend_tensor_set(d.tensor, src + pos, d.offset, n);
                        }
                    });
                } else {
                    tasks.emplace_back([this, &io, base, pos, n, d](int worker) {
                        read_range(base + pos, n, d, io.scratch(worker, platform_file::read_span(k_chunk)));
                    });
                }
            }
            total += p.expert_bytes;
        }
    }
    io.run(tasks);
    return total;
}

uint64_t expert_store::read_expert(int32_t il, int32_t e, const std::vector<read_dst> & dst) {
    return read_experts({ read_job{ il, e, dst } });
}

void expert_store::advise_willneed(int32_t il, int32_t e) const {
    const expert_layer * l = layer(il);
    if (!l) {
        return;
    }
    for (const auto & p : l->projs) {
        if (p.host) {
            mapping_will_need(p.host + (uint64_t) e * p.expert_bytes, p.expert_bytes);
        }
    }
}

void expert_store::release(int32_t il, int32_t e) const {
    const expert_layer * l = layer(il);
    if (!l) {
        return;
    }
    const uint64_t page   = page_size();
    const uint64_t margin = k_release_margin;
    for (const auto & p : l->projs) {
        // Outward by the kernel's fault-around window or folio (a fault maps
        // neighbouring cached pages too); a neighbour in use just faults them in again.
        const uint64_t lo = (uint64_t) e * p.expert_bytes;  // the expert within its tensor
        const uint64_t hi = lo + p.expert_bytes;
        if (p.host) {
            // our page table entries first (the page cache keeps pages that are mapped),
            // within the tensor; the platform layer widens the range to whole pages
            const uint64_t a = lo > k_unmap_margin ? lo - k_unmap_margin : 0;
            const uint64_t b = std::min(p.expert_bytes * (uint64_t) n_expert_, hi + k_unmap_margin);
            mapping_release(p.host + a, b - a);
        }
        const uint64_t off  = p.file_offset + lo;
        const uint64_t off0 = (off > margin ? off - margin : 0) & ~(page - 1);
        file_.drop_cache(off0, off + p.expert_bytes + margin - off0);
    }
}

double expert_store::measure_read_bandwidth(uint64_t max_bytes) {
    // a sample spread over layers and experts, as misses are
    std::vector<std::pair<int32_t, int32_t>> sample;
    uint64_t                                 planned = 0;
    for (int32_t e = n_expert_ - 1; e >= 0 && planned < max_bytes; e -= std::max(1, n_expert_ / 4)) {
        for (const auto & l : layers_) {
            if (l.il >= 0 && planned < max_bytes) {
                sample.emplace_back(l.il, e);
                planned += l.expert_bytes;
            }
        }
    }
    if (sample.empty()) {
        return 0.0;
    }
    uint64_t   bytes = 0;
    const auto t0    = std::chrono::steady_clock::now();
    if (from_host_) {
        // the copy a host-tier load makes (into RAM here; a device tier measures its own link)
        std::vector<uint8_t> sink;
        for (const auto & [il, e] : sample) {
            for (const auto & p : layers_[il].projs) {
                sink.resize(std::max<size_t>(sink.size(), p.expert_bytes));
                memcpy(sink.data(), p.host + (uint64_t) e * p.expert_bytes, p.expert_bytes);
                bytes += p.expert_bytes;
            }
        }
    } else {
        std::vector<read_job> jobs;
        for (const auto & [il, e] : sample) {
            if (!file_.uncached()) {
                for (const auto & p : layers_[il].projs) {  // measure the disk, not the page cache
                    file_.drop_cache(p.file_offset + (uint64_t) e * p.expert_bytes, p.expert_bytes);
                }
            }
            jobs.push_back({ il, e, std::vector<read_dst>(layers_[il].projs.size()) });  // read only
        }
        bytes = read_experts(jobs);
    }
    const double secs = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    return secs > 0 ? (double) bytes / secs : 0.0;
}

std::vector<std::string> expert_read(const std::string & path, int32_t il, int32_t e, bool direct_io) {
    expert_store         store(path, direct_io);
    const int32_t        n_expert = store.n_expert();
    const expert_layer * l        = store.layer(il);
    if (!l || e < 0 || e >= n_expert) {
        throw std::invalid_argument("'" + path + "' has no expert " + std::to_string(e) + " in layer " +
                                    std::to_string(il) + "; hint: " + std::to_string(n_expert) +
                                    " experts per MoE layer");
    }
    std::vector<std::string> out(l->projs.size());
    std::vector<read_dst>    dst(l->projs.size());
    for (size_t i = 0; i < out.size(); ++i) {
        out[i].resize(l->projs[i].expert_bytes);
        dst[i].host = reinterpret_cast<uint8_t *>(out[i].data());
    }
    store.read_expert(il, e, dst);
    return out;
}

}  // namespace pymoe

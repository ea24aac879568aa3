// Recording the routing of a real run (see pymoe-recorder.h).
#include "pymoe-recorder.h"

#include "pymoe-prefetch.h"

#include <cerrno>
#include <cstring>
#include <stdexcept>

namespace pymoe {

namespace {

constexpr size_t k_flush_bytes = 1u << 20;

std::string json_string(const std::string & s) {
    std::string out = "\"";
    for (unsigned char c : s) {
        if (c == '"' || c == '\\') {
            out += '\\';
            out += (char) c;
        } else if (c < 0x20) {
            char esc[8];
            std::snprintf(esc, sizeof(esc), "\\u%04x", c);
            out += esc;
        } else {
            out += (char) c;
        }
    }
    return out + "\"";
}

bool little_endian() {
    const uint16_t one = 1;
    uint8_t        first;
    std::memcpy(&first, &one, 1);
    return first == 1;
}

}  // namespace

routing_recorder::routing_recorder(const std::string & path, const record_header & h, const prefetcher * pf)
    : path_(path), pf_(pf), n_layer_(h.n_layer), depth_(pf ? h.prefetch_depth : 0) {
    f_ = std::fopen(path.c_str(), "wb");
    if (!f_) {
        throw std::runtime_error("cannot write the routing record '" + path + "': " + std::strerror(errno) +
                                 "; hint: pass --record-routing a path in a writable folder");
    }
    const std::string line = std::string("{\"format\": \"pymoe-routing\", \"version\": 1, \"byte_order\": ") +
                             (little_endian() ? "\"little\"" : "\"big\"") + ", \"model\": " + json_string(h.model) +
                             ", \"n_layer\": " + std::to_string(h.n_layer) + ", \"n_expert\": " +
                             std::to_string(h.n_expert) + ", \"n_expert_used\": " + std::to_string(h.n_expert_used) +
                             ", \"prefetch_depth\": " + std::to_string(depth_) + ", \"expert_bytes\": " +
                             std::to_string(h.expert_bytes) + ", \"expert_params\": " + std::to_string(h.expert_params) +
                             "}\n";
    buf_.assign(line.begin(), line.end());
    buf_.reserve(k_flush_bytes + (64u << 10));
}

routing_recorder::~routing_recorder() {
    try {
        flush();
    } catch (const std::exception &) {
        // nowhere to report it from a destructor; the file ends at the last complete write
    }
    std::fclose(f_);
}

template <typename T> void routing_recorder::put(const T * v, size_t n) {
    const auto * p = reinterpret_cast<const uint8_t *>(v);
    buf_.insert(buf_.end(), p, p + n * sizeof(T));
}

void routing_recorder::close_record() {
    if (open_layer_ < 0) {
        return;
    }
    guesses_.clear();
    for (int32_t d = 1; d <= depth_ && open_layer_ + d < n_layer_; ++d) {
        for (int32_t e : pf_->predicted(open_layer_ + d)) {
            guesses_.push_back(open_layer_ + d);
            guesses_.push_back(e);
        }
    }
    const int32_t n = (int32_t) (guesses_.size() / 2);
    put(&n, 1);
    put(guesses_.data(), guesses_.size());
    open_layer_ = -1;
}

void routing_recorder::route(int32_t il, int64_t n_tokens, int64_t n_used, const int32_t * experts,
                             const float * weights) {
    close_record();
    if (buf_.size() >= k_flush_bytes) {
        write_out();
    }
    const int32_t head[3] = { il, (int32_t) n_tokens, (int32_t) n_used };
    put(head, 3);
    put(experts, (size_t) (n_tokens * n_used));
    put(weights, (size_t) (n_tokens * n_used));
    open_layer_ = il;
}

void routing_recorder::flush() {
    close_record();
    write_out();
    if (std::fflush(f_) != 0) {
        throw std::runtime_error("writing the routing record '" + path_ + "' failed: " + std::strerror(errno));
    }
}

void routing_recorder::write_out() {
    if (!buf_.empty() && std::fwrite(buf_.data(), 1, buf_.size(), f_) != buf_.size()) {
        buf_.clear();
        throw std::runtime_error("writing the routing record '" + path_ + "' failed: " + std::strerror(errno) +
                                 "; hint: is the disk full?");
    }
    buf_.clear();
}

}  // namespace pymoe

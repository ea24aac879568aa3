// Recording the routing of a real run (--record-routing FILE): per step and
// MoE layer, the experts the router chose, their gate weights, and (with
// prefetching on) the predictor's guesses for the next layers, in the file
// format that pymoe.traces documents and pymoe simulate reads.
//
// File: one JSON line (format, version, byte order, the model's shape and
// expert size), then
// one binary record per step of a MoE layer, native byte order:
//   int32 layer, int32 n_tokens, int32 n_used,
//   int32 experts[n_tokens * n_used], float32 weights[n_tokens * n_used],
//   int32 n_guesses, int32 guesses[n_guesses][2] (target layer, expert).
// A record's guesses are what the predictor held for the later layers once
// that step was planned; they are written when the next record starts.
#pragma once

#include <cstdint>
#include <cstdio>
#include <string>
#include <vector>

namespace pymoe {

class prefetcher;

struct record_header {
    std::string model;  // the GGUF's file name (informative)
    int32_t     n_layer        = 0;
    int32_t     n_expert       = 0;
    int32_t     n_expert_used  = 0;
    int32_t     prefetch_depth = 0;  // 0: prefetching off, no guesses
    uint64_t    expert_bytes   = 0;  // one expert of the first MoE layer, all projections (the simulator's size)
    uint64_t    expert_params  = 0;  // its parameters (the simulator's compute)
};

class routing_recorder {
  public:
    // Creates (or truncates) `path` and writes the header; `pf` (may be null)
    // is read for the guesses and must outlive the recorder. Throws
    // std::runtime_error when the file cannot be written.
    routing_recorder(const std::string & path, const record_header & h, const prefetcher * pf);
    ~routing_recorder();  // completes the last record and writes the buffer out
    routing_recorder(const routing_recorder &)             = delete;
    routing_recorder & operator=(const routing_recorder &) = delete;

    // Layer il's step: experts and gate weights [n_tokens, n_used] as the router
    // chose them. Completes the previous step's record with its guesses first.
    // Buffered: the file is written in pieces of ~1 MiB. Throws
    // std::runtime_error when a write fails.
    void route(int32_t il, int64_t n_tokens, int64_t n_used, const int32_t * experts, const float * weights);

    // Completes the open record and writes everything buffered to the file.
    void flush();

  private:
    void close_record();
    void write_out();
    template <typename T> void put(const T * v, size_t n);

    std::string          path_;
    std::FILE *          f_ = nullptr;
    const prefetcher *   pf_;
    int32_t              n_layer_;
    int32_t              depth_;
    int32_t              open_layer_ = -1;  // the layer of the record awaiting its guesses
    std::vector<uint8_t> buf_;
    std::vector<int32_t> guesses_;
};

}  // namespace pymoe

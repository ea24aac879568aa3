// pymoe core: the one header that the bindings and the native tests include.
//
// One concern per source file:
//   pymoe-log.cpp      llama.cpp/ggml log routing, recent errors for exception messages
//   pymoe-gguf.cpp     reading a GGUF's metadata and tensor table without loading it
//   pymoe-model.cpp    a loaded model and its context: vocab, decode, logits, chat template
//   pymoe-sampler.cpp  llama.cpp's sampler chain
//   pymoe-quant.cpp    ggml's quantisers and dequantisers over threads
//
// Errors are thrown as std::runtime_error / std::invalid_argument with a message
// that names the object and ends with what the user can do ("hint: ...").
#pragma once

#include <cstdint>
#include <map>
#include <memory>
#include <string>
#include <variant>
#include <vector>

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

// llama.cpp's own build (the pinned upstream commit) and system info.
std::string llama_commit();
std::string system_info();

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
// model
//

struct model_params {
    std::string path;
    int32_t     n_ctx        = 0;    // 0 = min(trained context, 4096)
    int32_t     n_batch      = 512;  // tokens per llama_decode call
    int32_t     n_ubatch     = 512;  // tokens per graph evaluation
    int32_t     n_seq_max    = 1;    // parallel sequences (batched decode)
    int32_t     n_threads    = 0;    // 0 = all hardware threads
    int32_t     n_gpu_layers = -1;   // -1 = all layers on the GPU when there is one
    bool        use_mmap     = true;
    bool        flash_attn   = false;
    std::string cache_type   = "f16"; // KV cache element type (ggml type name: f32, f16, q8_0 ...)
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
    std::unique_ptr<llama_model, llama_model_deleter>     model_;
    std::unique_ptr<llama_context, llama_context_deleter> ctx_;
    const llama_vocab *                                   vocab_ = nullptr;

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

// A loaded model and its context: vocab, batched decode, logits, chat template,
// metadata. Everything here goes through llama.cpp's public API (llama.h).
#include "pymoe.h"

#include "pymoe-engine.h"

#include "ggml-backend.h"
#include "ggml-cpu.h"
#include "ggml.h"
#include "llama.h"

#include <algorithm>
#include <cstring>
#include <filesystem>
#include <stdexcept>
#include <thread>
#include <unordered_map>

namespace pymoe {

void model::llama_model_deleter::operator()(llama_model * m) const {
    llama_model_free(m);
}

void model::llama_context_deleter::operator()(llama_context * c) const {
    llama_free(c);
}

namespace {

std::string with_reason(const std::string & what, const std::string & reason) {
    return reason.empty() ? what : what + ": " + reason;
}

std::string meta_string(const llama_model * m, const std::string & key) {
    char          buf[256];
    const int32_t n = llama_model_meta_val_str(m, key.c_str(), buf, sizeof(buf));
    return n < 0 ? std::string() : std::string(buf);
}

// llama.cpp's vocabulary code looks tokens up with .at(): a vocabulary that
// lacks what its tokenizer expects (an SPM vocabulary without its byte
// tokens, a byte token with a malformed text) throws std::out_of_range, which
// is a broken file, not a caller's bad index
template <typename F> auto with_vocab(const char * what, F && f) -> decltype(f()) {
    try {
        return f();
    } catch (const std::out_of_range & e) {
        throw std::runtime_error(std::string("the model's vocabulary cannot ") + what + " (" + e.what() +
                                 "); hint: the vocabulary in the file is broken; convert or download the model again");
    }
}

int32_t meta_int(const llama_model * m, const std::string & key) {
    const std::string v = meta_string(m, key);
    return v.empty() ? 0 : (int32_t) std::stol(v);
}

}  // namespace

int32_t default_n_ctx(int32_t n_ctx_train) {
    return std::min(n_ctx_train > 0 ? n_ctx_train : 4096, 4096);
}

model::model(const model_params & params) : params_(params) {
    std::error_code ec;
    if (!std::filesystem::exists(params.path, ec)) {
        throw std::runtime_error("model file '" + params.path + "' does not exist; hint: check the path");
    }
    if (!std::filesystem::is_regular_file(params.path, ec)) {
        throw std::runtime_error("'" + params.path + "' is not a file; hint: pass the path of a .gguf file");
    }
    if (params.n_batch < 1 || params.n_ubatch < 1 || params.n_seq_max < 1 || params.n_ctx < 0) {
        throw std::invalid_argument("model '" + params.path +
                                    "': n_batch, n_ubatch and n_seq_max must be >= 1 and n_ctx >= 0");
    }
    gguf_validate(params.path);  // what llama.cpp would abort on instead of throwing
    if (params.offload.enabled && !params.offload.lo_path.empty()) {
        gguf_validate(params.offload.lo_path);  // the sidecar's weight types too
    }

    llama_model_params mp = llama_model_default_params();
    mp.n_gpu_layers       = params.n_gpu_layers;
    mp.load_mode          = params.use_mmap ? LLAMA_LOAD_MODE_MMAP : LLAMA_LOAD_MODE_NONE;
    // the devices layers may go to: this machine's GPUs and the RPC servers
    // asked for (always an explicit list: ggml's registry is process-wide, and
    // a server another model connected to earlier is not this model's device)
    std::vector<ggml_backend_dev_t> devices;
    for (size_t i = 0; i < ggml_backend_dev_count(); ++i) {
        ggml_backend_dev_t dev = ggml_backend_dev_get(i);
        const auto         t   = ggml_backend_dev_type(dev);
        if ((t == GGML_BACKEND_DEVICE_TYPE_GPU || t == GGML_BACKEND_DEVICE_TYPE_IGPU) && !is_rpc_device(dev)) {
            devices.push_back(dev);
        }
    }
    for (ggml_backend_dev_t dev : rpc_devices(params.rpc)) {
        devices.push_back(dev);
    }
    devices.push_back(nullptr);
    mp.devices = devices.data();

    // disk tier: llama.cpp maps the routed experts without reading them (the
    // engine reads what tokens need into its slots); host tier: they are loaded
    // into host buffers (not repacked: slots are byte copies of them) -- the
    // first device's pinned host buffer type when it has one, so that uploads
    // into slots on the device run at full link speed
    const bool offload_disk = params.offload.enabled && params.offload.tier == "disk";
    const bool offload_host = params.offload.enabled && params.offload.tier == "host";
    mp.lazy_experts         = offload_disk;
    // host tier: no repacking, since llama.cpp upgrades a CPU buffer-type
    // override of the experts to CPU_REPACK, whose bytes are not the file's
    // layout that slots copy. Disk tier: the experts are mapped lazily, never
    // repacked, so the other weights may be (faster kernels for them)
    mp.use_extra_bufts = params.repack && !offload_host;
    ggml_backend_buffer_type_t expert_buft = ggml_backend_cpu_buffer_type();
    if (devices[0] && params.n_gpu_layers != 0 && ggml_backend_dev_host_buffer_type(devices[0])) {
        expert_buft = ggml_backend_dev_host_buffer_type(devices[0]);
    }
    llama_model_tensor_buft_override host_experts[] = {
        { "\\.ffn_(gate|up|down|gate_up)_(ch)?exps\\.weight$", expert_buft },
        { nullptr, nullptr },
    };
    if (offload_host) {
        mp.tensor_buft_overrides = host_experts;
    }

    log_clear_errors();
    model_.reset(llama_model_load_from_file(params.path.c_str(), mp));
    if (!model_ && offload_host && expert_buft != ggml_backend_cpu_buffer_type()) {
        // pinned memory is scarcer than memory: fall back to plain host buffers
        host_experts[0].buft = ggml_backend_cpu_buffer_type();
        log_clear_errors();
        model_.reset(llama_model_load_from_file(params.path.c_str(), mp));
    }
    if (!model_) {
        throw std::runtime_error(
            with_reason("failed to load model '" + params.path + "'", log_take_errors()) +
            "\nhint: the file may be truncated, not a GGUF model, or of an architecture this llama.cpp does not know");
    }
    vocab_ = llama_model_get_vocab(model_.get());

    const int32_t n_threads = params.n_threads > 0 ? params.n_threads
                                                   : (int32_t) std::max(1u, std::thread::hardware_concurrency());
    llama_context_params cp = llama_context_default_params();
    const int32_t        n_ctx_train = llama_model_n_ctx_train(model_.get());
    cp.n_ctx           = params.n_ctx > 0 ? params.n_ctx : default_n_ctx(n_ctx_train);
    cp.n_batch         = params.n_batch;
    cp.n_ubatch        = std::min(params.n_ubatch, params.n_batch);
    cp.n_seq_max       = params.n_seq_max;
    cp.n_threads       = n_threads;
    cp.n_threads_batch = n_threads;
    cp.flash_attn_type = params.flash_attn ? LLAMA_FLASH_ATTN_TYPE_ENABLED : LLAMA_FLASH_ATTN_TYPE_DISABLED;
    cp.kv_unified      = true;  // sequences share the whole context
    cp.type_k          = (ggml_type) ggml_type_from_name(params.cache_type);
    cp.type_v          = cp.type_k;

    if (params.offload.enabled) {
        const std::string arch = meta_string(model_.get(), "general.architecture");
        engine_ = std::make_unique<engine>(params.path, params.offload, llama_model_n_layer(model_.get()),
                                           meta_int(model_.get(), arch + ".expert_count"),
                                           meta_int(model_.get(), arch + ".expert_used_count"),
                                           llama_model_n_embd(model_.get()), (int32_t) std::max(cp.n_batch, cp.n_ubatch),
                                           n_threads, model_layer_devices(model_.get()));
        cp.moe_hook          = engine_->hook();
        cp.cb_eval           = engine::eval_callback;
        cp.cb_eval_user_data = engine_.get();
    }
    cp.no_perf         = false;

    ctx_.reset(llama_init_from_model(model_.get(), cp));
    if (!ctx_) {
        throw std::runtime_error(with_reason("failed to create a context for '" + params.path + "'", log_take_errors()) +
                                 "\nhint: try a smaller n_ctx");
    }
    llama_set_abort_callback(
        ctx_.get(), [](void * flag) { return static_cast<std::atomic<bool> *>(flag)->load(std::memory_order_relaxed); },
        &abort_);
    params_.n_ctx     = (int32_t) llama_n_ctx(ctx_.get());
    params_.n_batch   = (int32_t) llama_n_batch(ctx_.get());
    params_.n_ubatch  = (int32_t) llama_n_ubatch(ctx_.get());
    params_.n_threads = n_threads;

    const size_t cap = (size_t) params_.n_batch;
    batch_tok_.resize(cap);
    batch_pos_.resize(cap);
    batch_nseq_.assign(cap, 1);
    batch_seq_.resize(cap);
    batch_seqp_.resize(cap);
    batch_out_.resize(cap);
    for (size_t i = 0; i < cap; ++i) {
        batch_seqp_[i] = &batch_seq_[i];
    }
}

model::~model() = default;

//
// vocab
//

std::vector<int32_t> model::tokenize(const std::string & text, bool add_special, bool parse_special) const {
    std::vector<int32_t> out(text.size() + 8);
    int32_t              n = with_vocab("tokenize this text", [&] {
        return llama_tokenize(vocab_, text.data(), (int32_t) text.size(), out.data(), (int32_t) out.size(),
                              add_special, parse_special);
    });
    if (n == INT32_MIN) {
        throw std::invalid_argument("text of " + std::to_string(text.size()) + " bytes is too long to tokenize");
    }
    if (n < 0) {
        out.resize((size_t) -n);
        n = with_vocab("tokenize this text", [&] {
            return llama_tokenize(vocab_, text.data(), (int32_t) text.size(), out.data(), (int32_t) out.size(),
                                  add_special, parse_special);
        });
    }
    out.resize((size_t) std::max(n, 0));
    return out;
}

std::string model::detokenize(const std::vector<int32_t> & tokens, bool remove_special, bool unparse_special) const {
    check_tokens(tokens.data(), (int32_t) tokens.size());
    return with_vocab("turn these tokens into text", [&] {
        std::string out(tokens.size() * 8 + 16, '\0');
        int32_t n = llama_detokenize(vocab_, tokens.data(), (int32_t) tokens.size(), out.data(), (int32_t) out.size(),
                                     remove_special, unparse_special);
        if (n < 0) {
            out.resize((size_t) -n);
            n = llama_detokenize(vocab_, tokens.data(), (int32_t) tokens.size(), out.data(), (int32_t) out.size(),
                                 remove_special, unparse_special);
        }
        out.resize((size_t) std::max(n, 0));
        return out;
    });
}

std::string model::token_to_piece(int32_t token, bool special) const {
    check_tokens(&token, 1);
    return with_vocab("turn this token into text", [&] {
        char    buf[256];
        int32_t n = llama_token_to_piece(vocab_, token, buf, sizeof(buf), 0, special);
        if (n >= 0) {
            return std::string(buf, (size_t) n);
        }
        std::string out((size_t) -n, '\0');
        n = llama_token_to_piece(vocab_, token, out.data(), (int32_t) out.size(), 0, special);
        out.resize((size_t) std::max(n, 0));
        return out;
    });
}

bool model::token_is_eog(int32_t token) const {
    return llama_vocab_is_eog(vocab_, token);
}

int32_t model::token_bos() const {
    return llama_vocab_bos(vocab_);
}

int32_t model::token_eos() const {
    return llama_vocab_eos(vocab_);
}

bool model::add_bos() const {
    return llama_vocab_get_add_bos(vocab_);
}

int32_t model::n_vocab() const {
    return llama_vocab_n_tokens(vocab_);
}

void model::check_tokens(const int32_t * tokens, int32_t n) const {
    const int32_t nv = n_vocab();
    for (int32_t i = 0; i < n; ++i) {
        if (tokens[i] < 0 || tokens[i] >= nv) {
            throw std::invalid_argument("token id " + std::to_string(tokens[i]) + " at index " + std::to_string(i) +
                                        " is out of range for a vocabulary of " + std::to_string(nv) +
                                        " tokens; hint: the ids must come from this model's tokenizer");
        }
    }
}

//
// decode
//

void model::decode(const int32_t * tokens, const int32_t * pos, const int32_t * seq, const int8_t * want,
                   int32_t n_tokens, float * out) {
    check_tokens(tokens, n_tokens);
    // the first position each sequence gets in this call: on failure, what
    // this call added is dropped again so the caller's view stays true.
    std::unordered_map<int32_t, int32_t> first_pos;
    for (int32_t i = 0; i < n_tokens; ++i) {
        if (seq[i] < 0 || seq[i] >= params_.n_seq_max) {
            throw std::invalid_argument("sequence id " + std::to_string(seq[i]) + " out of range [0, " +
                                        std::to_string(params_.n_seq_max) + "); hint: load with a larger n_seq_max");
        }
        if (pos[i] < 0 || pos[i] >= params_.n_ctx) {
            throw std::runtime_error("position " + std::to_string(pos[i]) + " is beyond the context of " +
                                     std::to_string(params_.n_ctx) +
                                     " tokens; hint: start a new conversation or load the model with a larger n_ctx");
        }
        auto it = first_pos.find(seq[i]);
        if (it == first_pos.end() || pos[i] < it->second) {
            first_pos[seq[i]] = pos[i];
        }
    }

    const int32_t nv     = n_vocab();
    size_t        n_out  = 0;
    for (int32_t start = 0; start < n_tokens; start += params_.n_batch) {
        const int32_t n = std::min(params_.n_batch, n_tokens - start);
        for (int32_t i = 0; i < n; ++i) {
            batch_tok_[i] = tokens[start + i];
            batch_pos_[i] = pos[start + i];
            batch_seq_[i] = seq[start + i];
            batch_out_[i] = want[start + i] ? 1 : 0;
        }
        llama_batch batch = {};
        batch.n_tokens    = n;
        batch.token       = batch_tok_.data();
        batch.pos         = batch_pos_.data();
        batch.n_seq_id    = batch_nseq_.data();
        batch.seq_id      = batch_seqp_.data();
        batch.logits      = batch_out_.data();

        log_clear_errors();
        // the abort callback stops a graph on the CPU backend; between batches it is checked here
        // (a GPU backend's graph runs to its end)
        int32_t     rc = start > 0 && abort_.load(std::memory_order_relaxed) ? 2 : llama_decode(ctx_.get(), batch);
        std::string engine_error;
        if (engine_) {
            try {
                engine_->end_batch();
            } catch (const std::exception & e) {
                engine_error = e.what();
                rc           = rc ? rc : -100;
            }
        }
        if (rc != 0) {
            for (const auto & [s, p] : first_pos) {
                llama_memory_seq_rm(llama_get_memory(ctx_.get()), s, p, -1);
            }
            if (!engine_error.empty()) {
                throw std::runtime_error(engine_error);
            }
            std::string what = rc == 1 ? "the context is full (n_ctx = " + std::to_string(params_.n_ctx) + ")"
                             : rc == 2 ? "decoding was aborted"
                                       : "llama_decode failed with code " + std::to_string(rc);
            throw std::runtime_error(with_reason(what, log_take_errors()) +
                                     (rc == 1 ? "\nhint: start a new conversation or load with a larger n_ctx" : ""));
        }
        for (int32_t i = 0; i < n; ++i) {
            if (!batch_out_[i]) {
                continue;
            }
            const float * row = llama_get_logits_ith(ctx_.get(), i);
            if (!row) {
                throw std::runtime_error("no logits for batch row " + std::to_string(start + i));
            }
            std::memcpy(out + n_out * (size_t) nv, row, sizeof(float) * (size_t) nv);
            ++n_out;
        }
    }
}

offload_stats model::get_offload_stats() const {
    if (!engine_) {
        throw std::logic_error("expert offload is off for this model");
    }
    return engine_->stats();
}

void model::offload_reset_stats() {
    if (engine_) {
        engine_->reset_stats();
    }
}

void model::memory_truncate(int32_t seq, int32_t pos0) {
    llama_memory_seq_rm(llama_get_memory(ctx_.get()), seq, std::max(pos0, 0), -1);
}

void model::memory_clear() {
    llama_memory_clear(llama_get_memory(ctx_.get()), true);
}

//
// chat template
//

std::string model::chat_template() const {
    const char * tmpl = llama_model_chat_template(model_.get(), nullptr);
    return tmpl ? tmpl : "";
}

std::string model::apply_chat_template(const std::string & tmpl_in, const std::vector<chat_message> & messages,
                                       bool add_assistant) const {
    const std::string tmpl = tmpl_in.empty() ? chat_template() : tmpl_in;
    if (tmpl.empty()) {
        throw std::invalid_argument("model '" + params_.path +
                                    "' has no chat template; hint: pass a template or use plain generation");
    }
    std::vector<llama_chat_message> msgs;
    size_t                          total = 0;
    for (const auto & m : messages) {
        msgs.push_back({ m.role.c_str(), m.content.c_str() });
        total += m.role.size() + m.content.size();
    }
    std::string buf(2 * total + 256, '\0');
    int32_t     n = llama_chat_apply_template(tmpl.c_str(), msgs.data(), msgs.size(), add_assistant, buf.data(),
                                              (int32_t) buf.size());
    if (n > (int32_t) buf.size()) {
        buf.resize((size_t) n);
        n = llama_chat_apply_template(tmpl.c_str(), msgs.data(), msgs.size(), add_assistant, buf.data(),
                                      (int32_t) buf.size());
    }
    if (n < 0) {
        throw std::invalid_argument("llama.cpp does not recognise this chat template");
    }
    buf.resize((size_t) n);
    return buf;
}

//
// metadata
//

namespace {

template <typename F> std::string read_string(F && f) {
    std::string buf(256, '\0');
    int32_t     n = f(buf.data(), buf.size());
    if (n >= (int32_t) buf.size()) {
        buf.resize((size_t) n + 1);
        n = f(buf.data(), buf.size());
    }
    buf.resize((size_t) std::max(n, 0));
    return buf;
}

}  // namespace

std::map<std::string, std::string> model::metadata() const {
    std::map<std::string, std::string> out;
    const int32_t                      n = llama_model_meta_count(model_.get());
    for (int32_t i = 0; i < n; ++i) {
        std::string key = read_string([&](char * b, size_t s) { return llama_model_meta_key_by_index(model_.get(), i, b, s); });
        std::string val = read_string([&](char * b, size_t s) { return llama_model_meta_val_str_by_index(model_.get(), i, b, s); });
        out.emplace(std::move(key), std::move(val));
    }
    return out;
}

std::string model::description() const {
    return read_string([&](char * b, size_t s) { return llama_model_desc(model_.get(), b, s); });
}

int32_t model::n_ctx() const { return params_.n_ctx; }
int32_t model::n_ctx_train() const { return llama_model_n_ctx_train(model_.get()); }
int32_t model::n_batch() const { return params_.n_batch; }
int32_t model::n_seq_max() const { return params_.n_seq_max; }
int32_t model::n_layer() const { return llama_model_n_layer(model_.get()); }
int32_t model::n_embd() const { return llama_model_n_embd(model_.get()); }
uint64_t model::size_bytes() const { return llama_model_size(model_.get()); }
uint64_t model::n_params() const { return llama_model_n_params(model_.get()); }
int32_t model::n_threads() const { return params_.n_threads; }

void model::set_n_threads(int32_t n_threads) {
    if (n_threads < 1) {
        throw std::invalid_argument("n_threads must be >= 1");
    }
    llama_set_n_threads(ctx_.get(), n_threads, n_threads);
    params_.n_threads = n_threads;
}

}  // namespace pymoe

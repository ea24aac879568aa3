// What a GGUF file can make llama.cpp abort on, checked before llama.cpp
// reads it.
//
// llama.cpp throws for most bad files (a missing key, a wrong key type, a
// tensor of the wrong shape), but some values reach a GGML_ASSERT first, which
// kills the process: in the loader (llama_model_base::load_hparams), in the
// vocabulary (llama_vocab::impl::load, tokenize), in the op constructors the
// loader and the graph build call (ggml_rope_ext, ggml_soft_max_add_sinks),
// in an architecture's graph builder (src/models/*.cpp), or in a CPU kernel at
// the first decode (binary_op on a weight type it has no code for). Each check
// below names the assert it stands for; the limits are those of the pinned
// source (llama-hparams.h). The same checks serve `pymoe info` and the model
// constructor.
#include "pymoe.h"

#include "ggml-cpp.h"
#include "ggml-cpu.h"
#include "ggml.h"
#include "gguf.h"
#include "llama.h"

#include <algorithm>
#include <optional>
#include <stdexcept>
#include <string>
#include <unordered_map>

namespace pymoe {

namespace {

constexpr uint32_t max_layers  = 512;   // LLAMA_MAX_LAYERS
constexpr uint32_t max_experts = 1024;  // LLAMA_MAX_EXPERTS
constexpr uint32_t n_gating_funcs = 5;  // llama_expert_gating_func_type: NONE .. SQRT_SOFTPLUS

// Architectures whose graph builder asserts n_embd_head_v == n_embd_head_k
// (`GGML_ASSERT(n_embd_head == hparams.n_embd_head_k())`) and, in the first
// list, n_embd_head_v == n_rot as well. tests/test_validate.py derives both
// lists from the pinned source, so a new pin that changes them fails a test.
const char * const archs_head_and_rot[] = {
    "apertus", "arcee", "arctic", "baichuan", "chameleon", "codeshell", "cogvlm", "cohere2moe", "dbrx", "deci",
    "deepseek", "dots1", "dream", "ernie4_5", "ernie4_5-moe", "exaone", "falcon", "granite", "granite_swa",
    "graniteswitch", "grok", "grovemoe", "hunyuan-moe", "hunyuan_vl", "hy_v3", "internlm2", "jais2", "llada",
    "llada-moe", "llama", "llama4", "maincoder", "mellum", "minimax-01", "minimax-m2", "minimax-m3", "mistral3",
    "nemotron", "olmo", "olmo2", "olmoe", "orion", "paddleocr", "pangu-embedded", "plamo", "pockettts", "qwen2",
    "qwen2moe", "qwen2vl", "qwen3", "qwen3moe", "qwen3vl", "qwen3vlmoe", "rnd1", "seed_oss", "smallthinker",
    "smollm3", "starcoder2", "xverse",
};
const char * const archs_head_only[] = {
    "afmoe", "bailingmoe2", "bert", "bitnet", "bloom", "chatglm", "cohere2", "command-r", "deepseek4", "dflash",
    "eagle3", "eurobert", "glm4", "glm4moe", "gpt2", "gptneox", "granitehybrid", "jais", "laguna", "modern-bert",
    "mpt", "muse-glimmer", "nanbeige", "nemotron_h", "nemotron_h_moe", "neo-bert", "openelm", "phi2", "phi3", "qwen",
    "qwen35", "qwen35moe", "qwen3next", "qwen4exp", "refact", "spark2_5", "stablelm", "starcoder", "t5",
};

// Architectures whose loader reads {arch}.expert_gating_func (the MoE graph
// aborts on a value it does not know), and those of them that pass it to the
// graph without a default for 0 / a missing key. Derived like the lists above.
const char * const archs_gating[] = {
    "afmoe", "bailingmoe2", "bailingmoe3", "cohere2moe", "deepseek2", "deepseek2-ocr", "deepseek32", "deepseek4",
    "dflash", "dots1", "dots3note", "exaone-moe", "glm-dsa", "glm4moe", "glm5-next", "hy_v3", "hy_v4", "kimi-k3",
    "kimi-linear", "laguna", "lfm2moe", "minimax-m2", "minimax-m3", "mistral4", "smallthinker", "step35",
};
const char * const archs_gating_required[] = {
    "bailingmoe2", "bailingmoe3", "deepseek32", "deepseek4", "dflash", "dots1", "dots3note", "exaone-moe", "hy_v4",
    "kimi-k3", "kimi-linear", "minimax-m2", "minimax-m3",
};

template <size_t N> bool listed(const char * const (&list)[N], const std::string & name) {
    return std::any_of(std::begin(list), std::end(list), [&](const char * a) { return name == a; });
}

// ggml's tensor-name suffixes of weights read by element-wise ops (mul, add,
// add_id, the softmax sinks, rope's frequency factors, the selection bias)
bool is_elementwise(const std::string & name, int n_dims) {
    auto has  = [&](const char * s) { return name.find(s) != std::string::npos; };
    auto ends = [&](const std::string & s) {
        return name.size() >= s.size() && name.compare(name.size() - s.size(), s.size(), s) == 0;
    };
    return n_dims == 1 || ends(".bias") || has("norm") || has("exp_probs_b") || has("attn_sinks") ||
           has("rope_freqs") || has("rope_factors") || ends(".ssm_a") || ends(".ssm_d") || has(".ssm_conv1d.");
}

bool cpu_can_matmul(ggml_type type) {
    return ggml_get_type_traits_cpu(type)->vec_dot != nullptr;
}

// types ggml-cpu's get_rows reads (ops.cpp, ggml_compute_forward_get_rows) that are also weight types
bool cpu_can_get_rows(ggml_type type) {
    return type == GGML_TYPE_F32 || type == GGML_TYPE_F16 || type == GGML_TYPE_BF16 ||
           (ggml_is_quantized(type) && cpu_can_matmul(type));
}

class checker {
  public:
    checker(const gguf_context * ctx, std::vector<std::string> & out) : ctx_(ctx), out_(out) {}

    void problem(const std::string & what) { out_.push_back(what); }

    int64_t find(const std::string & key) const { return gguf_find_key(ctx_, key.c_str()); }

    // a u32 key as llama.cpp reads it (get_key<uint32_t>: only that type);
    // another type is left to llama.cpp, which throws "key ... has wrong type"
    std::optional<uint32_t> u32(const std::string & key) const {
        const int64_t id = find(key);
        if (id < 0 || gguf_get_kv_type(ctx_, id) != GGUF_TYPE_UINT32) {
            return std::nullopt;
        }
        return gguf_get_val_u32(ctx_, id);
    }

    std::optional<float> f32(const std::string & key) const {
        const int64_t id = find(key);
        if (id < 0 || gguf_get_kv_type(ctx_, id) != GGUF_TYPE_FLOAT32) {
            return std::nullopt;
        }
        return gguf_get_val_f32(ctx_, id);
    }

    std::optional<std::string> str(const std::string & key) const {
        const int64_t id = find(key);
        if (id < 0 || gguf_get_kv_type(ctx_, id) != GGUF_TYPE_STRING) {
            return std::nullopt;
        }
        return std::string(gguf_get_val_str(ctx_, id));
    }

    // a per-layer key (get_key_or_arr): a u32, or a u32/i32 array of n_layer values
    std::vector<uint32_t> per_layer(const std::string & key, uint32_t n_layer) const {
        const int64_t id = find(key);
        if (id < 0) {
            return {};
        }
        if (gguf_get_kv_type(ctx_, id) == GGUF_TYPE_UINT32) {
            return std::vector<uint32_t>(n_layer, gguf_get_val_u32(ctx_, id));
        }
        if (gguf_get_kv_type(ctx_, id) != GGUF_TYPE_ARRAY || gguf_get_arr_n(ctx_, id) != n_layer) {
            return {};  // llama.cpp throws: wrong type or array length
        }
        const gguf_type at = gguf_get_arr_type(ctx_, id);
        if (at != GGUF_TYPE_UINT32 && at != GGUF_TYPE_INT32) {
            return {};
        }
        const auto * data = static_cast<const uint32_t *>(gguf_get_arr_data(ctx_, id));
        return std::vector<uint32_t>(data, data + n_layer);
    }

    const gguf_context * ctx() const { return ctx_; }

  private:
    const gguf_context *       ctx_;
    std::vector<std::string> & out_;
};

void check_mla(checker & c, const std::string & arch, uint32_t n_layer, uint32_t head_k, uint32_t head_v,
               uint32_t n_rot);

// llama_model_base::load_hparams and the graph builders' shape asserts
void check_hparams(checker & c, const std::string & arch) {
    const std::string p = arch + ".";
    const std::optional<uint32_t> n_layer = c.u32(p + "block_count");
    if (!n_layer) {
        return;  // missing or not u32: llama.cpp throws
    }
    if (*n_layer == 0 || *n_layer > max_layers) {
        c.problem(p + "block_count is " + std::to_string(*n_layer) + "; llama.cpp supports 1 to " +
                  std::to_string(max_layers) + " layers");
        return;  // the per-layer keys below are sized by it
    }
    if (auto nextn = c.u32(p + "nextn_predict_layers"); nextn && *nextn > *n_layer) {
        c.problem(p + "nextn_predict_layers is " + std::to_string(*nextn) + ", more than the " +
                  std::to_string(*n_layer) + " layers");
    }

    uint32_t n_expert = c.u32(p + "expert_count").value_or(0);
    if (arch == "hunyuan-vl" || arch == "hunyuan-dense") {
        n_expert = n_expert <= 1 ? 0 : n_expert;  // llama.cpp treats these as dense then
    }
    const std::vector<uint32_t> used_arr = c.per_layer(p + "expert_used_count", *n_layer);
    const uint32_t used = used_arr.empty() ? 0 : *std::max_element(used_arr.begin(), used_arr.end());
    const uint32_t n_groups   = c.u32(p + "expert_group_count").value_or(0);
    const uint32_t group_used = c.u32(p + "expert_group_used_count").value_or(0);
    if (n_expert > max_experts) {
        c.problem(p + "expert_count is " + std::to_string(n_expert) + "; llama.cpp supports at most " +
                  std::to_string(max_experts) + " experts");
    } else if (used > n_expert) {
        c.problem(p + "expert_used_count is " + std::to_string(used) + " but " + p + "expert_count is " +
                  std::to_string(n_expert) + ": a token cannot use more experts than there are");
    } else if (n_expert > 0 && used == 0) {
        c.problem(p + "expert_used_count is 0 (or missing) with " + std::to_string(n_expert) +
                  " experts: every token must use at least one");
    } else if (n_expert > 0) {
        if (n_groups >= n_expert) {
            c.problem(p + "expert_group_count is " + std::to_string(n_groups) + ", not fewer than the " +
                      std::to_string(n_expert) + " experts");
        } else if (n_groups > 1 && (n_expert % n_groups != 0 || group_used == 0 || group_used >= n_groups)) {
            c.problem(p + "expert_group_count " + std::to_string(n_groups) + " / expert_group_used_count " +
                      std::to_string(group_used) + " do not fit " + std::to_string(n_expert) +
                      " experts (the groups must divide them and 0 < used < groups)");
        }
    } else if (n_groups != 0) {
        c.problem(p + "expert_group_count is " + std::to_string(n_groups) + " in a model without experts");
    }
    if (listed(archs_gating, arch)) {
        const uint32_t gating   = c.u32(p + "expert_gating_func").value_or(0);
        const bool     required = listed(archs_gating_required, arch);
        if (gating >= n_gating_funcs || (gating == 0 && required && n_expert > 0)) {
            c.problem(p + "expert_gating_func is " + std::to_string(gating) + (c.find(p + "expert_gating_func") < 0 ? " (missing)" : "") +
                      "; llama.cpp's '" + arch + "' graph knows 1 (softmax) to " + std::to_string(n_gating_funcs - 1));
        }
    }

    // ggml-cpu's norm kernels assert eps >= 0 (ops.cpp): not negative, not NaN
    for (const char * key : { "attention.layer_norm_epsilon", "attention.layer_norm_rms_epsilon",
                              "attention.group_norm_epsilon" }) {
        if (auto eps = c.f32(p + key); eps && !(*eps >= 0.0f)) {
            c.problem(p + key + " is " + std::to_string(*eps) + "; a norm's epsilon must be >= 0");
        }
    }

    if (auto scaling = c.str(p + "rope.scaling.type")) {
        static const char * const known[] = { "none", "linear", "yarn", "longrope" };
        if (std::none_of(std::begin(known), std::end(known), [&](const char * k) { return *scaling == k; })) {
            c.problem(p + "rope.scaling.type is '" + *scaling + "'; llama.cpp knows none, linear, yarn, longrope");
        }
    }

    // head sizes as load_hparams derives them (from layer 0, as n_head() does)
    const std::optional<uint32_t> n_embd = c.u32(p + "embedding_length");
    const std::vector<uint32_t>   heads  = c.per_layer(p + "attention.head_count", *n_layer);
    const uint32_t                n_head = heads.empty() ? 0 : heads[0];
    if (!n_embd || n_head == 0) {
        return;
    }
    const uint32_t head_k = c.u32(p + "attention.key_length").value_or(*n_embd / n_head);
    const uint32_t head_v = c.u32(p + "attention.value_length").value_or(*n_embd / n_head);
    const uint32_t n_rot  = c.u32(p + "rope.dimension_count").value_or(head_k);
    const bool     rot    = listed(archs_head_and_rot, arch);
    if ((rot || listed(archs_head_only, arch)) && head_k != head_v) {
        c.problem("the key and value head sizes differ (" + std::to_string(head_k) + " and " +
                  std::to_string(head_v) + "), which llama.cpp's '" + arch + "' graph does not support");
    } else if (rot && n_rot != head_v) {
        c.problem(p + "rope.dimension_count is " + std::to_string(n_rot) + " but the head size is " +
                  std::to_string(head_v) + "; llama.cpp's '" + arch + "' graph rotates whole heads");
    }
    if (arch == "gpt-oss" && (head_k != n_rot || head_v != n_rot)) {
        // its weights are shaped by n_rot, its KV cache rows by the head sizes (models/openai-moe.cpp)
        c.problem("the key and value head sizes (" + std::to_string(head_k) + ", " + std::to_string(head_v) +
                  ") must equal " + p + "rope.dimension_count (" + std::to_string(n_rot) + ") for llama.cpp's gpt-oss");
    }
    if (arch == "deepseek2" || arch == "mistral4" || arch == "hy_v4") {
        check_mla(c, arch, *n_layer, head_k, head_v, n_rot);
    }
}

// multi-head latent attention (models/deepseek2.cpp, and the models reusing
// its loader): the key head splits into a rotated part and the rest, and with
// the absorbed (MLA) layout the KV cache holds one compressed head per token
void check_mla(checker & c, const std::string & arch, uint32_t n_layer, uint32_t head_k, uint32_t head_v,
               uint32_t n_rot) {
    const std::string p     = arch + ".";
    const uint32_t    k_mla = c.u32(p + "attention.key_length_mla").value_or(0);
    const uint32_t    v_mla = c.u32(p + "attention.value_length_mla").value_or(0);
    const bool        mla   = k_mla != 0 && v_mla != 0;
    const uint32_t    key   = mla ? k_mla : head_k;
    if (key <= n_rot) {  // GGML_ASSERT(n_embd_head_qk_nope >= 1)
        c.problem(p + "rope.dimension_count is " + std::to_string(n_rot) + ", not less than the key head size " +
                  std::to_string(key) + " that it is a part of");
        return;
    }
    if (!mla || arch == "hy_v4") {
        return;
    }
    // the cache rows the graph writes (ggml_set_rows asserts the sizes match)
    const std::vector<uint32_t> kv = c.per_layer(p + "attention.head_count_kv", n_layer);
    const uint32_t kv_lora = c.u32(p + "attention.kv_lora_rank").value_or(0);
    if (!kv.empty() && std::any_of(kv.begin(), kv.end(), [](uint32_t h) { return h != 1; })) {
        c.problem(p + "attention.head_count_kv must be 1 with latent attention (the cache holds one compressed head)");
    } else if (kv.empty() && c.find(p + "attention.head_count_kv") < 0) {
        c.problem(p + "attention.head_count_kv is missing; latent attention needs it to be 1");
    } else if (head_k != kv_lora + n_rot || head_v != kv_lora) {
        c.problem("the attention head sizes (key " + std::to_string(head_k) + ", value " + std::to_string(head_v) +
                  ") do not match the latent attention's cache (kv_lora_rank " + std::to_string(kv_lora) +
                  " + rope " + std::to_string(n_rot) + ", and kv_lora_rank)");
    }
}

// llama_vocab::impl::load: the token list before llama.cpp builds its maps
void check_vocab_header(checker & c) {
    const gguf_context *       ctx   = c.ctx();
    const std::optional<std::string> model = c.str("tokenizer.ggml.model");
    if (!model) {
        return;  // llama.cpp throws when the key is missing or not a string
    }
    if (*model == "none" || *model == "no_vocab") {
        c.problem("tokenizer.ggml.model is '" + *model + "': the file has no vocabulary to tokenize text with");
        return;
    }
    const int64_t id = c.find("tokenizer.ggml.tokens");
    if (id < 0 || gguf_get_kv_type(ctx, id) != GGUF_TYPE_ARRAY || gguf_get_arr_type(ctx, id) != GGUF_TYPE_STRING) {
        return;  // llama.cpp throws
    }
    // GGML_ASSERT(id_to_token.size() == token_to_id.size()): every token text
    // once (llama.cpp renames an empty token i to "[EMPTY_i]" first)
    const size_t                         n = gguf_get_arr_n(ctx, id);
    std::unordered_map<std::string, size_t> seen;
    seen.reserve(n);
    for (size_t i = 0; i < n; ++i) {
        std::string text = gguf_get_arr_str(ctx, id, i);
        if (text.empty()) {
            text = "[EMPTY_" + std::to_string(i) + "]";
        }
        auto [it, fresh] = seen.emplace(std::move(text), i);
        if (!fresh) {
            c.problem("tokenizer.ggml.tokens holds '" + it->first.substr(0, 40) + "' twice (tokens " +
                      std::to_string(it->second) + " and " + std::to_string(i) + "); every token must be unique");
            return;
        }
    }
    // a WordPiece vocabulary has no byte tokens: llama.cpp aborts in token_to_byte
    const int64_t types = c.find("tokenizer.ggml.token_type");
    if (*model == "bert" && types >= 0 && gguf_get_kv_type(ctx, types) == GGUF_TYPE_ARRAY &&
        gguf_get_arr_type(ctx, types) == GGUF_TYPE_INT32) {
        const auto * t = static_cast<const int32_t *>(gguf_get_arr_data(ctx, types));
        for (size_t i = 0; i < std::min(n, gguf_get_arr_n(ctx, types)); ++i) {
            if (t[i] == LLAMA_TOKEN_TYPE_BYTE) {
                c.problem("tokenizer.ggml.token_type marks token " + std::to_string(i) +
                          " as a byte token, which a WordPiece ('bert') vocabulary cannot have");
                return;
            }
        }
    }
}

// tokenize() asserts that the BOS/EOS/SEP token it is told to add exists: the
// vocabulary as llama.cpp resolves it (defaults per tokenizer, ids out of range
// dropped, the add_* keys), loaded alone
void check_vocab_tokens(checker & c, const std::string & path) {
    llama_model_params mp = llama_model_default_params();
    mp.vocab_only         = true;
    log_clear_errors();
    llama_model * m = llama_model_load_from_file(path.c_str(), mp);
    const std::string why = log_take_errors();
    if (m == nullptr) {
        c.problem("llama.cpp cannot read the vocabulary" + (why.empty() ? std::string() : ": " + why));
        return;
    }
    const llama_vocab * v = llama_model_get_vocab(m);
    struct special {
        const char * name;
        const char * key;
        bool         add;
        llama_token  id;
    };
    const special wanted[] = {
        { "BOS", "bos_token_id", llama_vocab_get_add_bos(v), llama_vocab_bos(v) },
        { "EOS", "eos_token_id", llama_vocab_get_add_eos(v), llama_vocab_eos(v) },
        { "SEP", "seperator_token_id", llama_vocab_type(v) == LLAMA_VOCAB_TYPE_WPM && llama_vocab_get_add_sep(v),
          llama_vocab_sep(v) },
    };
    for (const special & s : wanted) {
        if (s.add && s.id == LLAMA_TOKEN_NULL) {
            c.problem(std::string("the vocabulary adds a ") + s.name + " token to every prompt but has no valid " +
                      s.name + " token (tokenizer.ggml." + s.key + ")");
        }
    }
    llama_model_free(m);
}

// what reads each weight, by the tensor-name conventions of llama.cpp's converter
void check_tensor_types(checker & c) {
    const gguf_context * ctx = c.ctx();
    const int64_t        n   = gguf_get_n_tensors(ctx);
    const bool tied = gguf_find_tensor(ctx, "output.weight") < 0;  // token_embd is also the output matmul
    for (int64_t i = 0; i < n; ++i) {
        const std::string name = gguf_get_tensor_name(ctx, i);
        const ggml_type   type = gguf_get_tensor_type(ctx, i);
        const int64_t *   ne   = gguf_get_tensor_ne(ctx, i);
        int               n_dims = GGML_MAX_DIMS;
        while (n_dims > 1 && ne[n_dims - 1] == 1) {
            --n_dims;
        }
        const char * tn = ggml_type_name(type);
        if (name == "token_embd.weight" || name == "position_embd.weight" || name == "token_types.weight") {
            if (!cpu_can_get_rows(type) || (tied && name == "token_embd.weight" && !cpu_can_matmul(type))) {
                c.problem("tensor '" + name + "' is " + tn + ", which the CPU backend cannot look rows up in" +
                          (tied ? " or multiply" : ""));
            }
        } else if (is_elementwise(name, n_dims)) {
            // binary ops take a weight operand in F32 only when the activations
            // are F32 (ggml-cpu binary-ops.cpp); rope factors and sinks are asserted F32
            if (type != GGML_TYPE_F32) {
                c.problem("tensor '" + name + "' is " + tn +
                          "; llama.cpp's CPU backend reads norms, biases and other vectors only as f32");
            }
        } else if (!cpu_can_matmul(type)) {
            c.problem("tensor '" + name + "' is " + tn + ", which the CPU backend has no matrix multiplication for");
        }
    }
}

}  // namespace

std::vector<std::string> gguf_problems(const std::string & path) {
    gguf_read_info(path, 0);  // throws for what is not a complete, parseable GGUF

    gguf_init_params params = { /*.no_alloc =*/true, /*.ctx =*/nullptr };
    gguf_context_ptr ctx(gguf_init_from_file(path.c_str(), params));
    std::vector<std::string> out;
    if (!ctx) {
        out.push_back("ggml cannot parse the header");
        return out;
    }
    checker c(ctx.get(), out);
    check_tensor_types(c);
    const std::optional<std::string> type = c.str("general.type");
    if (type && *type == "pymoe-sidecar") {
        return out;  // expert weights only: no hyperparameters or vocabulary of its own
    }
    // the loader stores it in a llama_ftype, which holds 0..2047 (its largest
    // value is LLAMA_FTYPE_GUESSED, 1024); anything else is undefined behaviour
    if (auto ft = c.u32("general.file_type"); ft && *ft > 2047) {
        c.problem("general.file_type is " + std::to_string(*ft) + ", which is not a llama.cpp file type");
    }
    const std::optional<std::string> arch = c.str("general.architecture");
    if (!arch) {
        return out;  // llama.cpp throws
    }
    check_hparams(c, *arch);
    check_vocab_header(c);
    if (out.empty()) {  // llama.cpp reads the whole header: not a file already known to be broken
        check_vocab_tokens(c, path);
    }
    return out;
}

void gguf_check_loadable(const std::string & path) {
    gguf_validate(path);
    llama_model_params mp = llama_model_default_params();
    mp.no_alloc           = true;                   // no buffers, no data read
    mp.load_mode          = LLAMA_LOAD_MODE_NONE;   // nothing mapped either
    mp.n_gpu_layers       = 0;
    mp.use_extra_bufts    = false;
    log_clear_errors();
    llama_model * m = llama_model_load_from_file(path.c_str(), mp);
    if (m == nullptr) {
        const std::string why = log_take_errors();
        throw std::runtime_error("llama.cpp would not load '" + path + "'" + (why.empty() ? "" : ": " + why));
    }
    llama_model_free(m);
}

void gguf_validate(const std::string & path) {
    const std::vector<std::string> problems = gguf_problems(path);
    if (problems.empty()) {
        return;
    }
    std::string msg = "'" + path + "' cannot be loaded: " + problems[0];
    for (size_t i = 1; i < problems.size(); ++i) {
        msg += "; " + problems[i];
    }
    throw std::runtime_error(msg + "\nhint: the file's metadata or tensor types are corrupt or inconsistent; "
                                   "convert or download the model again");
}

}  // namespace pymoe

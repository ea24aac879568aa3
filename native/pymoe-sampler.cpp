// llama.cpp's sampler chain, configured from one struct.
#include "pymoe.h"

#include "llama.h"

#include <stdexcept>
#include <vector>

namespace pymoe {

void sampler::llama_sampler_deleter::operator()(llama_sampler * s) const {
    llama_sampler_free(s);
}

sampler::sampler(const sampler_params & p, int32_t n_vocab) : params_(p) {
    if (p.top_p <= 0.0f || p.min_p < 0.0f || p.min_p > 1.0f || p.repeat_penalty <= 0.0f || p.repeat_last_n < -1) {
        throw std::invalid_argument(
            "sampler: need 0 < top_p, 0 <= min_p <= 1, repeat_penalty > 0 and repeat_last_n >= -1");
    }
    llama_sampler_chain_params cp = llama_sampler_chain_default_params();
    cp.no_perf                    = true;
    chain_.reset(llama_sampler_chain_init(cp));
    llama_sampler * c = chain_.get();
    if (p.repeat_penalty != 1.0f && p.repeat_last_n != 0) {
        llama_sampler_chain_add(c, llama_sampler_init_penalties(n_vocab, p.repeat_last_n, p.repeat_penalty, 0.0f, 0.0f));
    }
    if (p.temperature <= 0.0f) {
        llama_sampler_chain_add(c, llama_sampler_init_greedy());
        return;
    }
    if (p.top_k > 0) {
        llama_sampler_chain_add(c, llama_sampler_init_top_k(p.top_k));
    }
    if (p.top_p < 1.0f) {
        llama_sampler_chain_add(c, llama_sampler_init_top_p(p.top_p, 1));
    }
    if (p.min_p > 0.0f) {
        llama_sampler_chain_add(c, llama_sampler_init_min_p(p.min_p, 1));
    }
    llama_sampler_chain_add(c, llama_sampler_init_temp(p.temperature));
    llama_sampler_chain_add(c, llama_sampler_init_dist(p.seed));
}

sampler::~sampler() = default;

int32_t sampler::sample(model & m, int32_t idx) {
    return llama_sampler_sample(chain_.get(), m.context(), idx);
}

int32_t sampler::sample_logits(const float * logits, int32_t n_vocab) {
    std::vector<llama_token_data> cand((size_t) n_vocab);
    for (int32_t i = 0; i < n_vocab; ++i) {
        cand[i] = { i, logits[i], 0.0f };
    }
    llama_token_data_array arr = { cand.data(), cand.size(), -1, false };
    llama_sampler_apply(chain_.get(), &arr);
    if (arr.selected < 0 || arr.selected >= (int64_t) arr.size) {
        throw std::runtime_error("sampler selected no token");
    }
    const int32_t tok = arr.data[arr.selected].id;
    llama_sampler_accept(chain_.get(), tok);
    return tok;
}

void sampler::accept(int32_t token) {
    llama_sampler_accept(chain_.get(), token);
}

void sampler::reset() {
    llama_sampler_reset(chain_.get());
}

}  // namespace pymoe

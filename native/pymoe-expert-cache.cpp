// The expert cache (see pymoe-expert-cache.h).
#include "pymoe-expert-cache.h"

#include "ggml-alloc.h"
#include "ggml.h"

#include <algorithm>
#include <cmath>
#include <map>
#include <stdexcept>
#include <string>

namespace pymoe {

namespace {

constexpr uint64_t k_pinned = UINT64_MAX;  // pinned_step of a slot filled in the background

std::string format_key(const expert_layer & l) {
    std::string key;
    for (const auto & p : l.projs) {
        key += std::to_string(p.kind) + ":" + std::to_string(p.type) + ":" + std::to_string(p.ne[0]) + "x" +
               std::to_string(p.ne[1]) + ";";
    }
    return key;
}

// builds the pools' tensors for `slots`, one fresh no-alloc context per buffer
// type (in the order the classes first name them)
std::vector<std::pair<ggml_backend_buffer_type_t, ggml_context_ptr>> make_pool_tensors(
    const std::vector<expert_layer> & layers, std::vector<pool_class> & classes, const std::vector<int32_t> & slots) {
    std::vector<std::pair<ggml_backend_buffer_type_t, ggml_context_ptr>> out;
    for (size_t c = 0; c < classes.size(); ++c) {
        pool_class & pc = classes[c];
        pc.n_slots      = slots[c];
        std::fill(std::begin(pc.tensors), std::end(pc.tensors), nullptr);
        if (pc.n_slots == 0) {
            continue;
        }
        auto it = std::find_if(out.begin(), out.end(), [&](const auto & x) { return x.first == pc.buft; });
        if (it == out.end()) {
            ggml_init_params params = { ggml_tensor_overhead() * (classes.size() * PROJ_COUNT + 1), nullptr, true };
            out.emplace_back(pc.buft, ggml_context_ptr(ggml_init(params)));
            it = out.end() - 1;
        }
        for (const auto & p : layers[pc.layers[0]].projs) {
            // [n_in, n_out, n_slots]
            ggml_tensor * t = ggml_new_tensor_3d(it->second.get(), (ggml_type) p.type, p.ne[0], p.ne[1], pc.n_slots);
            ggml_format_name(t, "pymoe_pool%zu_%s", c, proj_kind_name(p.kind));
            pc.tensors[p.kind] = t;
        }
    }
    return out;
}

}  // namespace

expert_cache::expert_cache(const std::vector<expert_layer> & layers, int32_t n_expert, uint64_t budget,
                           const std::vector<ggml_backend_buffer_type_t> & layer_buft,
                           std::unique_ptr<eviction_policy> policy, std::vector<double> profile, bool allocate,
                           bool per_layer)
    : n_expert_(n_expert), budget_(budget), policy_(std::move(policy)), profile_(std::move(profile)) {
    const int32_t n_layer = (int32_t) layers.size();
    if (layer_buft.size() != 1 && layer_buft.size() != (size_t) n_layer) {
        throw std::logic_error("expert_cache: one buffer type, or one per layer");
    }
    auto buft_of = [&](int32_t il) { return layer_buft.size() == 1 ? layer_buft[0] : layer_buft[(size_t) il]; };
    if (!profile_.empty() && profile_.size() != (size_t) n_layer * (size_t) n_expert_) {
        throw std::invalid_argument("expert profile has " + std::to_string(profile_.size()) + " entries, the model " +
                                    std::to_string(n_layer) + " x " + std::to_string(n_expert_) +
                                    " experts; hint: record the profile on this model");
    }
    if (!policy_->admits_on_miss() && profile_.empty()) {
        throw std::invalid_argument("the static policy needs a usage profile; hint: record one with a run under "
                                    "lru (Model.stats()['expert_pairs']) and pass it as profile");
    }
    if (policy_->wants_prediction()) {
        model_ = std::make_unique<routing_model>(n_layer, n_expert_);
    }
    class_of_.assign((size_t) n_layer, -1);
    slot_of_.assign((size_t) n_layer * (size_t) n_expert_, -1);
    uses_.assign(slot_of_.size(), 0);
    hi_uses_.assign(slot_of_.size(), 0);
    recent_.assign(slot_of_.size(), 0.0);
    recent_step_.assign(slot_of_.size(), 0);
    if (profile_.empty()) {
        profile_.assign(slot_of_.size(), 0.0);
    }

    std::map<std::string, int32_t> by_key;
    for (const auto & l : layers) {
        if (l.il < 0) {
            continue;
        }
        ggml_backend_buffer_type_t buft = buft_of(l.il);
        const std::string key = format_key(l) + "@" + ggml_backend_buft_name(buft) +
                                (per_layer ? "@" + std::to_string(l.il) : "");
        auto              it  = by_key.find(key);
        if (it == by_key.end()) {
            it = by_key.emplace(key, (int32_t) classes_.size()).first;
            classes_.emplace_back();
            classes_.back().slot_bytes = l.expert_bytes;
            classes_.back().buft       = buft;
            classes_.back().host       = ggml_backend_buft_is_host(buft);
        }
        classes_[it->second].layers.push_back(l.il);
        class_of_[l.il] = it->second;
    }

    // the same share of every class's experts, then what is left slot by slot
    uint64_t total = 0;
    for (const auto & pc : classes_) {
        total += pc.slot_bytes * pc.layers.size() * (uint64_t) n_expert_;
    }
    const double         share = total ? std::min(1.0, (double) budget / (double) total) : 0.0;
    std::vector<int32_t> slots(classes_.size(), 0);
    std::vector<int32_t> cap(classes_.size(), 0);
    for (size_t c = 0; c < classes_.size(); ++c) {
        cap[c]   = (int32_t) classes_[c].layers.size() * n_expert_;
        slots[c] = std::min(cap[c], (int32_t) (share * cap[c]));
    }
    auto size_of = [&](const std::vector<int32_t> & s) {
        uint64_t bytes = 0;
        for (const auto & [buft, ctx] : make_pool_tensors(layers, classes_, s)) {
            bytes += (uint64_t) ggml_backend_alloc_ctx_tensors_from_buft_size(ctx.get(), buft);
        }
        return bytes;
    };
    while (size_of(slots) > budget) {  // alignment padding can push the floor over the budget
        auto biggest = std::max_element(slots.begin(), slots.end());
        if (biggest == slots.end() || *biggest == 0) {
            break;
        }
        --*biggest;
    }
    for (bool grew = true; grew;) {
        grew = false;
        for (size_t c = 0; c < classes_.size(); ++c) {
            if (slots[c] >= cap[c]) {
                continue;
            }
            ++slots[c];
            if (size_of(slots) <= budget) {
                grew = true;
            } else {
                --slots[c];
            }
        }
    }

    planned_bytes_ = size_of(slots);  // (before the final tensors: size_of rebuilds them in scratch contexts)
    for (auto & [buft, ctx] : make_pool_tensors(layers, classes_, slots)) {
        if (allocate) {
            ggml_backend_buffer_ptr buf(ggml_backend_alloc_ctx_tensors_from_buft(ctx.get(), buft));
            if (!buf) {
                throw std::runtime_error("cannot allocate " +
                                         std::to_string(ggml_backend_alloc_ctx_tensors_from_buft_size(ctx.get(), buft) >> 20) +
                                         " MiB in " + ggml_backend_buft_name(buft) +
                                         " for the expert cache; hint: pass a smaller expert budget");
            }
            // weights: the scheduler runs a pool's matmuls where its slots live
            ggml_backend_buffer_set_usage(buf.get(), GGML_BACKEND_BUFFER_USAGE_WEIGHTS);
            ggml_backend_buffer_clear(buf.get(), 0);  // resident from the start: the budget is what it costs
            buf_.push_back(std::move(buf));
        }
        ctx_.push_back(std::move(ctx));
    }
    for (auto & pc : classes_) {
        pc.owner_layer.assign((size_t) pc.n_slots, -1);
        pc.owner_expert.assign((size_t) pc.n_slots, -1);
        pc.last_use.assign((size_t) pc.n_slots, 0);
        pc.pinned_step.assign((size_t) pc.n_slots, 0);
        pc.ready.assign((size_t) pc.n_slots, 0);
    }
}

void expert_cache::count(int32_t il, int32_t e, uint64_t pairs, uint64_t hi_pairs, uint64_t step) {
    const size_t i = index(il, e);
    uses_[i] += pairs;
    hi_uses_[i] += hi_pairs;
    recent_[i]      = recent(il, e, step) + (double) pairs;
    recent_step_[i] = step;
}

double expert_cache::recent(int32_t il, int32_t e, uint64_t step) const {
    const size_t i = index(il, e);
    if (half_life_ <= 0.0 || step <= recent_step_[i]) {
        return recent_[i];
    }
    return recent_[i] * std::exp2(-(double) (step - recent_step_[i]) / half_life_);
}

int32_t expert_cache::n_slots() const {
    int32_t n = 0;
    for (const auto & pc : classes_) {
        n += pc.n_slots;
    }
    return n;
}

uint64_t expert_cache::allocated_bytes() const {
    uint64_t n = 0;
    for (const auto & b : buf_) {
        n += ggml_backend_buffer_get_size(b.get());
    }
    return n;
}

uint64_t expert_cache::allocated_bytes(ggml_backend_buffer_type_t buft) const {
    uint64_t n = 0;
    for (const auto & b : buf_) {
        n += ggml_backend_buffer_get_type(b.get()) == buft ? ggml_backend_buffer_get_size(b.get()) : 0;
    }
    return n;
}

void expert_cache::touch(int32_t il, int32_t e, uint64_t step) {
    const int32_t slot = lookup(il, e);
    if (slot < 0) {
        return;
    }
    pool_class & pc      = classes_[class_of_[il]];
    pc.last_use[slot]    = step;
    pc.pinned_step[slot] = step;
}

int32_t expert_cache::candidate_slot(int32_t il, uint64_t step, int32_t * victim_layer, int32_t * victim_expert) const {
    *victim_layer = *victim_expert = -1;
    const int32_t c = class_of(il);
    if (c < 0 || classes_[c].n_slots == 0) {
        return -1;
    }
    const pool_class & pc = classes_[c];
    for (int32_t s = 0; s < pc.n_slots; ++s) {
        if (pc.owner_layer[s] < 0) {
            return s;
        }
    }
    if (policy_->needs_future() && !future_) {
        throw std::logic_error(std::string("the ") + policy_->name() + " policy needs the future of the trace");
    }
    std::vector<slot_view> cands;
    std::vector<int32_t>   cand_slot;
    cands.reserve((size_t) pc.n_slots);
    for (int32_t s = 0; s < pc.n_slots; ++s) {
        if (pc.pinned_step[s] == step || pc.pinned_step[s] == k_pinned) {
            continue;
        }
        cands.push_back(view(pc.owner_layer[s], pc.owner_expert[s], step));
        cand_slot.push_back(s);
    }
    if (cands.empty()) {
        return -1;
    }
    const int32_t slot = cand_slot[policy_->pick_victim(cands.data(), cands.size())];
    *victim_layer      = pc.owner_layer[slot];
    *victim_expert     = pc.owner_expert[slot];
    return slot;
}

slot_view expert_cache::view(int32_t il, int32_t e, uint64_t step) const {
    const size_t i = index(il, e);
    slot_view    v{ il, e, step, uses_[i], profile_[i], hi_uses_[i] };
    const int32_t s = slot_of_[i];
    if (s >= 0) {
        v.last_use = classes_[class_of_[il]].last_use[s];
    }
    v.recent   = recent(il, e, step);
    v.next_use = future_ ? future_->next_use(il, e, step) : k_no_next_use;
    v.p_next   = model_ ? model_->p_next(il, e) : 0.0;
    return v;
}

bool expert_cache::admits(int32_t il, int32_t e, int32_t victim_layer, int32_t victim_expert, uint64_t step) const {
    return policy_->admit(view(il, e, step), view(victim_layer, victim_expert, step));
}

int32_t expert_cache::assign(int32_t il, int32_t e, uint64_t step, bool * evicted, bool ready) {
    *evicted = false;
    if (holds(il, e) >= 0) {
        touch(il, e, step);
        return holds(il, e);
    }
    int32_t       vl = -1, ve = -1;
    const int32_t slot = candidate_slot(il, step, &vl, &ve);
    if (slot < 0) {
        return -1;
    }
    pool_class & pc = classes_[class_of_[il]];
    if (vl >= 0) {
        slot_of_[index(vl, ve)] = -1;
        *evicted                = true;
    }
    pc.owner_layer[slot]   = il;
    pc.owner_expert[slot]  = e;
    pc.last_use[slot]      = step;
    pc.pinned_step[slot]   = ready ? step : k_pinned;
    pc.ready[slot]         = ready;
    slot_of_[index(il, e)] = slot;
    return slot;
}

void expert_cache::publish(int32_t il, int32_t e) {
    const int32_t slot = holds(il, e);
    if (slot >= 0) {
        pool_class & pc      = classes_[class_of_[il]];
        pc.ready[slot]       = 1;
        pc.pinned_step[slot] = pc.pinned_step[slot] == k_pinned ? 0 : pc.pinned_step[slot];
    }
}

void expert_cache::pin(int32_t il, int32_t e) {
    const int32_t slot = holds(il, e);
    if (slot >= 0) {
        classes_[class_of_[il]].pinned_step[slot] = k_pinned;
    }
}

void expert_cache::unpin(int32_t il, int32_t e) {
    const int32_t slot = holds(il, e);
    if (slot >= 0 && classes_[class_of_[il]].pinned_step[slot] == k_pinned) {
        classes_[class_of_[il]].pinned_step[slot] = 0;
    }
}

void expert_cache::release(int32_t il, int32_t e) {
    const int32_t slot = holds(il, e);
    if (slot < 0) {
        return;
    }
    pool_class & pc       = classes_[class_of_[il]];
    pc.owner_layer[slot]  = -1;
    pc.owner_expert[slot] = -1;
    pc.ready[slot]        = 0;
    pc.pinned_step[slot]  = 0;
    slot_of_[index(il, e)] = -1;
}

std::vector<read_dst> expert_cache::slot_dst(int32_t c, int32_t slot, const expert_layer & layer) const {
    std::vector<read_dst> out;
    for (const auto & p : layer.projs) {
        ggml_tensor * t = classes_[c].tensors[p.kind];
        read_dst      d;
        if (classes_[c].host) {
            d.host = static_cast<uint8_t *>(t->data) + (uint64_t) slot * t->nb[2];
        } else {
            d.tensor = t;
            d.offset = (uint64_t) slot * t->nb[2];
        }
        out.push_back(d);
    }
    return out;
}

std::vector<std::pair<int32_t, int32_t>> expert_cache::hot_set() const {
    std::vector<std::pair<int32_t, int32_t>> out;
    for (const auto & pc : classes_) {
        std::vector<std::pair<double, std::pair<int32_t, int32_t>>> ranked;
        for (int32_t il : pc.layers) {
            for (int32_t e = 0; e < n_expert_; ++e) {
                ranked.push_back({ profile_[index(il, e)], { il, e } });
            }
        }
        std::stable_sort(ranked.begin(), ranked.end(), [](const auto & a, const auto & b) { return a.first > b.first; });
        for (int32_t i = 0; i < pc.n_slots && i < (int32_t) ranked.size(); ++i) {
            out.push_back(ranked[i].second);
        }
    }
    return out;
}

}  // namespace pymoe

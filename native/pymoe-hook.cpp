// The llama_moe_hook: builds each MoE layer's experts as a high-precision
// pool branch, a low-precision pool branch (with a sidecar) and a direct
// branch. The only pymoe file that includes llama.cpp internals
// (src/llama-ext.h, the staging header our patch 0002 extends).
#include "pymoe-engine.h"

#include "ggml-backend.h"
#include "ggml.h"
#include "llama-ext.h"
#include "llama-model.h"

namespace pymoe {

namespace {

class moe_hook : public llama_moe_hook {
  public:
    explicit moe_hook(engine & eng) : eng_(eng) {}

    ggml_tensor * build_experts(ggml_context * ctx, ggml_cgraph * gf, const llama_moe_layer & layer,
                                const llama_moe_chain & chain) override {
        GGML_UNUSED(gf);
        const int32_t        il = layer.il;
        const expert_layer * el = eng_.layer(il);
        if (!el || layer.has_scales || layer.n_tokens > eng_.n_tokens_max() ||
            layer.n_expert_used != eng_.plan_tensors(il).ids_direct->ne[0]) {
            return nullptr;  // upstream builds this layer from the model's tensors
        }
        // the model's expert tensors are llama.cpp's mapping of the file (or host copies)
        ggml_tensor * model_w[PROJ_COUNT] = { layer.gate_exps, layer.up_exps, layer.down_exps, layer.gate_up_exps };
        built_layer   v;
        v.il    = il;
        v.route = { layer.selected, layer.weights, layer.input };
        for (const auto & p : el->projs) {
            const ggml_tensor * t = model_w[p.kind];
            GGML_ASSERT(t && t->type == p.type && t->ne[0] == p.ne[0] && t->ne[1] == p.ne[1] && t->ne[2] == p.ne[2]);
            v.expert_data[p.kind]    = static_cast<const uint8_t *>(t->data);
            v.expert_tensors[p.kind] = model_w[p.kind];
        }
        v.gate_inp    = layer.gate_inp;
        v.exp_probs_b = layer.exp_probs_b;
        v.gating      = layer.gating_op;
        eng_.on_layer_built(v);

        // views of the persistent plan tensors for this ubatch: [n_used, n_tokens]
        const layer_plan_tensors & pt     = eng_.plan_tensors(il);
        const int64_t              n_used = layer.n_expert_used;
        auto view = [&](ggml_tensor * t, int32_t branch) {
            ggml_tensor * v = ggml_view_2d(ctx, t, n_used, layer.n_tokens, t->nb[1], (size_t) branch * n_used * t->nb[0]);
            // The engine reads the router's choice at the sync point (the
            // weights node), after the weights' get_rows, its last upstream
            // reader: the allocator could hand its memory to another node by
            // then (it did with 1-token ubatches). A view that lists it as a
            // source keeps it allocated until the experts run, where flagging it
            // an output would also stop backends from fusing the router's ops
            // (CUDA's top-k MoE kernel). Backends never read a view's sources.
            v->src[1] = layer.selected;
            return v;
        };
        auto pool_branch = [&](const expert_cache * cache, int32_t br_ids, int32_t br_ids_b) -> ggml_tensor * {
            const int32_t c = cache ? cache->class_of(il) : -1;
            if (c < 0 || cache->cls(c).n_slots == 0) {
                return nullptr;
            }
            ggml_tensor * const * pool = cache->cls(c).tensors;
            return chain(pool[PROJ_UP], pool[PROJ_GATE], pool[PROJ_DOWN], pool[PROJ_GATE_UP], view(pt.ids_dev, br_ids),
                         view(pt.ids_dev, br_ids_b));  // [n_embd, n_used, n_tokens]
        };

        ggml_tensor * ids_direct = view(pt.ids_direct, 0);
        ggml_tensor * out        = chain(layer.up_exps, layer.gate_exps, layer.down_exps, layer.gate_up_exps,
                                         ids_direct, ids_direct);  // [n_embd, n_used, n_tokens]
        // every pair belongs to one branch and the others' rows are zero: the sum is exact
        for (ggml_tensor * b : { pool_branch(&eng_.cache(), PLAN_POOL, PLAN_POOL_B),
                                 pool_branch(eng_.cache_lo(), PLAN_LO, PLAN_LO_B) }) {
            if (b) {
                out = ggml_add(ctx, b, out);
            }
        }
        if (pt.skip_scale) {
            // skipped pairs renormalised away: the kept pairs' outputs scaled up, before the caller weights them
            ggml_tensor * s = ggml_view_3d(ctx, pt.skip_scale, 1, n_used, layer.n_tokens, pt.skip_scale->nb[0],
                                           pt.skip_scale->nb[1], 0);  // [1, n_used, n_tokens]
            out = ggml_mul(ctx, out, s);
        }
        return out;
    }

  private:
    engine & eng_;
};

}  // namespace

std::vector<ggml_backend_dev_t> model_layer_devices(const llama_model * model) {
    std::vector<ggml_backend_dev_t> out;
    for (int32_t il = 0; il < (int32_t) model->hparams.n_layer(); ++il) {
        ggml_backend_dev_t dev = model->dev_layer(il);
        out.push_back(dev && ggml_backend_dev_type(dev) != GGML_BACKEND_DEVICE_TYPE_CPU ? dev : nullptr);
    }
    return out;
}

llama_moe_hook * make_moe_hook(engine & eng) {
    return new moe_hook(eng);
}

void engine::hook_deleter::operator()(llama_moe_hook * h) const {
    delete h;
}

}  // namespace pymoe

/* The FLUX.1 transformer (diffusers' FluxTransformer2DModel): config, typed
 * weights, loading, memory plan and one straight-line forward.
 *
 * Naming below: B batch, St text tokens, Si image tokens, S = St + Si,
 * D = inner_dim = heads * head_dim, F = mlp hidden (4 D), Dh head dim.
 *
 * Loading takes a diffusers model folder (config.json + diffusion_pytorch_model
 * *.safetensors, sharded through an index or not) with f32/f16/bf16 weights or
 * bitsandbytes 4-bit weights (config.json "quantization_config"), or a Black
 * Forest Labs single file (flux1-*.safetensors) plus a config. Every size comes
 * from the config; every tensor must be present with the shape the config
 * implies, and no tensor may be left over. Errors name the key.
 *
 * The forward computes in f32 and, for bf16/f16 models, rounds to that dtype at
 * each point where diffusers' PyTorch code would (docs/flux-traps.md). */
#ifndef FQ_MODELS_FLUX_H
#define FQ_MODELS_FLUX_H

#include "core/qtensor.h"

/* ---- config ------------------------------------------------------------------------ */

typedef struct {
    int64_t patch_size;             /* 1                                     */
    int64_t in_channels;            /* 64: packed latent channels           */
    int64_t out_channels;           /* null in config.json -> in_channels    */
    int64_t num_layers;             /* 19 double-stream blocks              */
    int64_t num_single_layers;      /* 38 single-stream blocks              */
    int64_t attention_head_dim;     /* 128                                   */
    int64_t num_attention_heads;    /* 24                                    */
    int64_t joint_attention_dim;    /* 4096: T5 hidden size                 */
    int64_t pooled_projection_dim;  /* 768: CLIP pooled size                */
    int guidance_embeds;            /* 1 for FLUX.1-dev, 0 for schnell       */
    int64_t axes_dims_rope[3];      /* (16, 56, 56), sums to head dim       */
    /* derived */
    int64_t inner_dim;              /* D = heads * head_dim                  */
    int64_t mlp_dim;                /* F = 4 * D                             */
    int64_t out_dim;                /* patch_size^2 * out_channels           */
} fq_flux_config;

/* Fills c from a config.json object (a cJSON *), validating every field:
 * positive sizes, axes even and summing to the head dim. */
struct cJSON;
fq_status fq_flux_config_from_json(fq_ctx *ctx, const struct cJSON *json, fq_flux_config *c);

/* ---- weights ------------------------------------------------------------------------ */

/* One linear layer y = x·Wᵀ + b: a dense weight (f32/f16/bf16, as stored in
 * the file) or a 4-bit one, never both. Owned by the model. */
typedef struct {
    fq_tensor *w;    /* [out, in] dense, or NULL */
    fq_qtensor *qw;  /* [out, in] NF4/FP4, or NULL */
    fq_tensor *b;    /* [out] */
} fq_flux_linear;

/* FluxTransformerBlock (double stream: image "h" and text "c" side by side). */
typedef struct {
    fq_flux_linear norm1;          /* [6D, D] AdaLN-Zero of the image stream   */
    fq_flux_linear norm1_context;  /* [6D, D] AdaLN-Zero of the text stream    */
    fq_flux_linear to_q, to_k, to_v;          /* [D, D] image projections      */
    fq_flux_linear add_q, add_k, add_v;       /* [D, D] text projections       */
    fq_tensor *norm_q, *norm_k;               /* [Dh] RMSNorm weights (image)  */
    fq_tensor *norm_added_q, *norm_added_k;   /* [Dh] RMSNorm weights (text)   */
    fq_flux_linear to_out;         /* [D, D] attn.to_out.0                     */
    fq_flux_linear to_add_out;     /* [D, D]                                   */
    fq_flux_linear ff1, ff2;       /* [F, D], [D, F] ff.net.0.proj, ff.net.2   */
    fq_flux_linear ff_ctx1, ff_ctx2; /* [F, D], [D, F] ff_context              */
} fq_flux_double;

/* FluxSingleTransformerBlock (one stream over text + image tokens). */
typedef struct {
    fq_flux_linear norm;           /* [3D, D] AdaLN-Zero-Single                */
    fq_flux_linear to_q, to_k, to_v; /* [D, D]                                 */
    fq_tensor *norm_q, *norm_k;    /* [Dh]                                     */
    fq_flux_linear proj_mlp;       /* [F, D]                                   */
    fq_flux_linear proj_out;       /* [D, D + F]                               */
} fq_flux_single;

typedef struct fq_flux_model {
    fq_flux_config cfg;
    fq_device device;               /* where every weight lives                 */
    fq_dtype weight_dtype;          /* dtype of the dense tensors in the file   */
    fq_dtype compute_dtype;         /* rounding the forward reproduces          */
    int quantized;                  /* any 4-bit linear                         */
    fq_flux_linear time_l1;         /* [D, 256] timestep_embedder.linear_1      */
    fq_flux_linear time_l2;         /* [D, D]                                   */
    fq_flux_linear guid_l1;         /* [D, 256] guidance_embedder (dev only)    */
    fq_flux_linear guid_l2;         /* [D, D]                                   */
    fq_flux_linear text_l1;         /* [D, pooled] text_embedder.linear_1       */
    fq_flux_linear text_l2;         /* [D, D]                                   */
    fq_flux_linear context_embedder; /* [D, joint_attention_dim]                */
    fq_flux_linear x_embedder;      /* [D, in_channels]                         */
    fq_flux_double *blocks;         /* [num_layers]                             */
    fq_flux_single *single;         /* [num_single_layers]                      */
    fq_flux_linear norm_out;        /* [2D, D] AdaLayerNormContinuous: scale, shift */
    fq_flux_linear proj_out;        /* [out_dim, D]                             */
    size_t weight_bytes;            /* device bytes held by the weights         */
} fq_flux_model;

typedef enum {
    FQ_FLUX_LAYOUT_AUTO = 0,  /* a folder: diffusers; a .safetensors file: BFL */
    FQ_FLUX_LAYOUT_DIFFUSERS,
    FQ_FLUX_LAYOUT_BFL
} fq_flux_layout;

typedef struct {
    fq_device device;          /* default cpu                                  */
    fq_flux_layout layout;     /* default AUTO                                 */
    /* For a BFL single file: the config.json to read the sizes from (a file or
     * a folder holding config.json). NULL: config.json next to the file. */
    const char *config_path;
    /* -1 (default): the dtype diffusers computes in (bnb_4bit_compute_dtype, or
     * the dtype of the dense weights). FQ_F32 computes in plain f32. */
    int compute_dtype;
} fq_flux_load_params;

fq_flux_load_params fq_flux_load_default_params(void);

/* Loads a model from path (see the top of this file). *out: caller frees with
 * fq_flux_free. On failure nothing is returned and nothing leaks. */
fq_status fq_flux_load(fq_ctx *ctx, const char *path, const fq_flux_load_params *p, fq_flux_model **out);
void fq_flux_free(fq_flux_model *m);

/* ---- forward ------------------------------------------------------------------------ */

/* The activation arena for one (batch, St, Si), allocated once on the model's
 * device; a forward allocates nothing. Its linear scratch is sized for the
 * context's fq_ctx_set_linear_kernel setting at plan time (a later change can
 * make a forward fail with a scratch-size error, never overrun). The model must
 * outlive the plan. Owned by the caller (fq_flux_plan_free). */
typedef struct fq_flux_plan fq_flux_plan;

fq_status fq_flux_plan_create(fq_ctx *ctx, const fq_flux_model *m, int64_t batch, int64_t txt_tokens,
                              int64_t img_tokens, fq_flux_plan **out);
void fq_flux_plan_free(fq_flux_plan *p);
/* Bytes of the arena (activations + scratch). */
size_t fq_flux_plan_bytes(const fq_flux_plan *p);
/* Whether the MLPs' first linear applies GELU in its GEMM epilogue, on the f32
 * result (fq_nn_linear_gelu_cols: one bf16 rounding fewer than diffusers'
 * gelu(bf16(x·Wᵀ + b)), within the golden bars; no separate GELU pass). On by
 * default where the device supports it (CUDA, bf16 compute); off: the exact
 * two-op path, the CPU forward's bits. */
void fq_flux_plan_set_fused_gelu(fq_flux_plan *p, int on);

/* Observer of intermediate activations (tests, debugging): called during the
 * forward with diffusers' module names ("x_embedder", "time_text_embed",
 * "transformer_blocks.3.norm1.x", "single_transformer_blocks.0" for the joint
 * stream, ...). t is valid only during the call. */
typedef void (*fq_flux_tap_fn)(void *user, const char *name, const fq_tensor *t);
void fq_flux_plan_set_tap(fq_flux_plan *p, fq_flux_tap_fn fn, void *user);

/* Transformer inputs, as diffusers' forward takes them; any float dtype, on the
 * model's device. */
typedef struct {
    const fq_tensor *hidden_states;          /* [B, Si, in_channels] packed latents     */
    const fq_tensor *encoder_hidden_states;  /* [B, St, joint_attention_dim] (T5)       */
    const fq_tensor *pooled_projections;     /* [B, pooled_projection_dim] (CLIP)       */
    const fq_tensor *timestep;               /* [B] sigma; the model multiplies by 1000 */
    const fq_tensor *guidance;               /* [B] guidance scale, or NULL (schnell)   */
    const fq_tensor *img_ids;                /* [Si, 3] positions                       */
    const fq_tensor *txt_ids;                /* [St, 3] positions (zeros)               */
} fq_flux_inputs;

/* out = transformer(inputs): [B, Si, out_dim] f32 on the model's device
 * (values rounded to the compute dtype). Shapes must match the plan. */
fq_status fq_flux_forward(fq_ctx *ctx, const fq_flux_model *m, fq_flux_plan *p, const fq_flux_inputs *in,
                          fq_tensor *out);

#endif

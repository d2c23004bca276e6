// CPU host versions of the transform-format CUDA ops, for tests/kernels/test_transform_host.py.
//
// Compiled with g++ (torch.utils.cpp_extension.load, CPU only). Registers the ops' own schemas
// (csrc/transform_schema.h) under the namespace seqkv_host, reads the arguments with the ops'
// own code (csrc/transform_args.h) and runs the SAME per-element functions as the kernels
// (csrc/transform_format.cuh) in serial loops laid out like the kernels' blocks: write = one
// (token, head) at a time, decode = one (sequence, kv head, split) partial with kDecodeTile-row
// steps of online softmax, then one reduce per (sequence, query head). This checks the math;
// it cannot check the kernels' thread/block structure (barriers, shared-memory sizing), which
// only a GPU run of tests/kernels/test_cuda_ops.py does.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <algorithm>
#include <tuple>
#include <vector>

#include "transform_args.h"
#include "transform_format.cuh"
#include "transform_schema.h"

namespace seqkv {
namespace transform {
namespace {

at::Tensor as_float(const at::Tensor& t) { return t.to(at::kFloat).contiguous(); }

void write_transform_slots_host(const at::Tensor& key_in, const at::Tensor& value_in,
                                const at::Tensor& slot_mapping, at::Tensor& pages,
                                const std::optional<at::Tensor>& prev_k, const std::optional<at::Tensor>& prev_v,
                                at::TensorList k_tables, at::TensorList v_tables, at::IntArrayRef k_format,
                                at::IntArrayRef v_format) {
  TORCH_CHECK(pages.device().is_cpu(), "host op: pages must be on CPU");
  check_pages(pages);
  const int64_t heads = pages.size(1), block_size = pages.size(2);
  TORCH_CHECK(key_in.dim() == 3 && key_in.size(1) == heads && is_float(key_in), "key must be float [T, H, D]");
  const int64_t tokens = key_in.size(0), dim = key_in.size(2);
  check_head_dim(dim);
  TORCH_CHECK(value_in.sizes() == key_in.sizes() && is_float(value_in), "value must match key");
  TORCH_CHECK(slot_mapping.dim() == 1 && slot_mapping.size(0) == tokens, "slot_mapping must be [T]");
  const StreamTables ks = stream_tables(k_tables, k_format, pages, heads, dim);
  const StreamTables vs = stream_tables(v_tables, v_format, pages, heads, dim);
  const bool has_prev = check_previous(prev_k, prev_v, ks.has_pred || vs.has_pred, tokens * heads * dim, pages);
  const at::Tensor key = as_float(key_in), value = as_float(value_in);
  const at::Tensor slots = slot_mapping.to(at::kLong).contiguous();
  at::Tensor pk, pv;
  if (has_prev) {
    pk = as_float(*prev_k);
    pv = as_float(*prev_v);
  }
  const int D = static_cast<int>(dim), hd = static_cast<int>(heads * dim);
  std::vector<float> residual(D);
  std::vector<int> codes(D);
  for (int64_t t = 0; t < tokens; ++t) {
    const int64_t slot_id = slots.data_ptr<int64_t>()[t];
    if (slot_id < 0) continue;
    for (int h = 0; h < heads; ++h) {
      uint8_t* slot = pages.data_ptr<uint8_t>() + (slot_id / block_size) * pages.stride(0) + h * pages.stride(1) +
                      (slot_id % block_size) * pages.stride(2);
      const float* x_rows[2] = {key.data_ptr<float>() + (t * heads + h) * D, value.data_ptr<float>() + (t * heads + h) * D};
      const StreamTables* streams[2] = {&ks, &vs};
      for (int which = 0; which < 2; ++which) {  // the kernel's encode_stream, thread c -> loop c
        const StreamTables& s = *streams[which];
        for (int c = 0; c < D; ++c) {
          float r = x_rows[which][c];
          if (s.has_pred) {
            r -= predict_element(pk.data_ptr<float>() + t * hd, pv.data_ptr<float>() + t * hd, s.pred_w, s.pred_b,
                                 hd, h * D + c);
          }
          residual[c] = r;
        }
        for (int c = 0; c < D; ++c) {
          const float z = component_z(residual.data(), s.mean + h * D, s.basis + static_cast<int64_t>(h) * D * D, c, D);
          codes[c] = quantize(s.cuts + s.level_start[h * D + c], s.nbits[h * D + c], z);
        }
        for (int j = 0; j < s.nbytes; ++j) {
          slot[s.offset + j] = pack_byte(codes.data(), s.start + h * D, s.nbits + h * D, D, j);
        }
      }
    }
  }
}

std::tuple<at::Tensor, at::Tensor> transform_decode_attention_host(
    const at::Tensor& query_in, const at::Tensor& own_k_in, const at::Tensor& own_v_in, const at::Tensor& pages,
    const at::Tensor& block_table_in, const at::Tensor& seq_lens_in, const std::optional<at::Tensor>& rope_in,
    const std::optional<at::Tensor>& prev_k, const std::optional<at::Tensor>& prev_v, at::TensorList k_tables,
    at::TensorList v_tables, at::IntArrayRef k_format, at::IntArrayRef v_format, double scale_in, int64_t num_splits,
    int64_t skip_first) {
  TORCH_CHECK(pages.device().is_cpu(), "host op: pages must be on CPU");
  check_pages(pages);
  const int64_t heads = pages.size(1), block_size = pages.size(2);
  TORCH_CHECK(query_in.dim() == 3 && is_float(query_in), "query must be float [B, Hq, D]");
  const int64_t batch = query_in.size(0), q_heads = query_in.size(1), dim = query_in.size(2);
  check_head_dim(dim);
  TORCH_CHECK(q_heads % heads == 0, "query heads must be a multiple of kv heads");
  TORCH_CHECK(block_table_in.dim() == 2 && block_table_in.size(0) == batch, "block_table must be [B, max_blocks]");
  TORCH_CHECK(seq_lens_in.scalar_type() == block_table_in.scalar_type(), "seq_lens must be in block_table's dtype");
  TORCH_CHECK(skip_first >= 0, "skip_first must be >= 0");
  const StreamTables ks = stream_tables(k_tables, k_format, pages, heads, dim);
  const StreamTables vs = stream_tables(v_tables, v_format, pages, heads, dim);
  const int64_t max_tokens = block_table_in.size(1) * block_size;
  const bool has_prev =
      check_previous(prev_k, prev_v, ks.has_pred || vs.has_pred, batch * max_tokens * heads * dim, pages);
  const bool has_rope = rope_in.has_value() && rope_in->defined();
  const at::Tensor query = as_float(query_in), own_k = as_float(own_k_in), own_v = as_float(own_v_in);
  const at::Tensor block_table = block_table_in.to(at::kLong).contiguous();
  const at::Tensor seq_lens = seq_lens_in.to(at::kLong).contiguous();
  at::Tensor pk, pv, rope_t;
  if (has_prev) {
    pk = as_float(*prev_k);
    pv = as_float(*prev_v);
  }
  if (has_rope) rope_t = as_float(*rope_in);
  const float* rope = has_rope ? rope_t.data_ptr<float>() : nullptr;
  const float scale = static_cast<float>(scale_in);

  const int D = static_cast<int>(dim), G = static_cast<int>(q_heads / heads), hd = static_cast<int>(heads * dim);
  const int64_t splits = choose_splits(num_splits, batch, heads, max_tokens);
  const int64_t chunk = (max_tokens + splits - 1) / splits;
  const int64_t states = batch * q_heads * splits;
  std::vector<float> acc_out(states * D), pred_out(states * D), max_out(states), sum_out(states);
  std::vector<float> zbuf(kDecodeTile * D), kbuf(kDecodeTile * D), probs(G * kDecodeTile), acc(G * D),
      pacc(G * D), run_max(G), run_sum(G), alpha(G);

  // partial: one (sequence, kv head, split) at a time, as one block of the kernel
  for (int64_t b = 0; b < batch; ++b) {
    for (int kvh = 0; kvh < heads; ++kvh) {
      const float* inverse_k = ks.inverse + static_cast<int64_t>(kvh) * D * D;
      const float* mean_k = ks.mean + kvh * D;
      const float* q = query.data_ptr<float>() + (b * q_heads + kvh * G) * D;
      auto slot_of = [&](int64_t pos) {
        const int64_t block = block_table.data_ptr<int64_t>()[b * block_table.size(1) + pos / block_size];
        return pages.data_ptr<uint8_t>() + block * pages.stride(0) + kvh * pages.stride(1) +
               (pos % block_size) * pages.stride(2);
      };
      auto prev_row = [&](int64_t pos) { return (b * max_tokens + pos) * hd; };
      for (int64_t split = 0; split < splits; ++split) {
        std::fill(acc.begin(), acc.end(), 0.f);
        std::fill(pacc.begin(), pacc.end(), 0.f);
        std::fill(run_max.begin(), run_max.end(), kNegBig);
        std::fill(run_sum.begin(), run_sum.end(), 0.f);
        const int64_t cached_len = seq_lens.data_ptr<int64_t>()[b] - 1;
        const int64_t start = std::max<int64_t>(split * chunk, skip_first);
        const int64_t end = std::min<int64_t>(std::min<int64_t>((split + 1) * chunk, cached_len), max_tokens);
        for (int64_t t0 = start; t0 < end; t0 += kDecodeTile) {
          const int n = static_cast<int>(std::min<int64_t>(kDecodeTile, end - t0));
          for (int i = 0; i < n * D; ++i) zbuf[i] = component_level(ks, slot_of(t0 + i / D), kvh, i % D, D);
          for (int i = 0; i < n * D; ++i) {
            const int j = i / D, d = i % D;
            float k = rebuild_element(zbuf.data() + j * D, inverse_k, mean_k, d, D);
            if (ks.has_pred) {
              const int64_t row = prev_row(t0 + j);
              k += predict_element(pk.data_ptr<float>() + row, pv.data_ptr<float>() + row, ks.pred_w, ks.pred_b, hd,
                                   kvh * D + d);
            }
            kbuf[i] = k;
          }
          if (rope != nullptr) {
            for (int i = 0; i < n * (D / 2); ++i) {
              const int j = i / (D / 2);
              rope_pair(kbuf.data() + j * D, rope + (t0 + j) * D, i % (D / 2), D);
            }
          }
          for (int i = 0; i < G * n; ++i) {
            const int g = i / n, j = i % n;
            probs[g * kDecodeTile + j] = row_dot(q + g * D, kbuf.data() + j * D, D) * scale;
          }
          for (int g = 0; g < G; ++g) alpha[g] = online_softmax_tile(probs.data() + g * kDecodeTile, n, run_max[g], run_sum[g]);
          for (int i = 0; i < n * D; ++i) zbuf[i] = component_level(vs, slot_of(t0 + i / D), kvh, i % D, D);
          if (vs.has_pred) {
            for (int i = 0; i < n * D; ++i) {
              const int64_t row = prev_row(t0 + i / D);
              kbuf[i] = predict_element(pk.data_ptr<float>() + row, pv.data_ptr<float>() + row, vs.pred_w, vs.pred_b,
                                        hd, kvh * D + i % D);
            }
          }
          for (int i = 0; i < G * D; ++i) {
            const int g = i / D, c = i % D;
            float a = acc[i] * alpha[g], pa = pacc[i] * alpha[g];
            for (int j = 0; j < n; ++j) {
              a += probs[g * kDecodeTile + j] * zbuf[j * D + c];
              if (vs.has_pred) pa += probs[g * kDecodeTile + j] * kbuf[j * D + c];
            }
            acc[i] = a;
            pacc[i] = pa;
          }
        }
        for (int g = 0; g < G; ++g) {
          const int64_t state = (b * q_heads + kvh * G + g) * splits + split;
          std::copy(acc.begin() + g * D, acc.begin() + (g + 1) * D, acc_out.begin() + state * D);
          std::copy(pacc.begin() + g * D, pacc.begin() + (g + 1) * D, pred_out.begin() + state * D);
          max_out[state] = run_max[g];
          sum_out[state] = run_sum[g];
        }
      }
    }
  }
  // reduce: one (sequence, query head) at a time
  at::Tensor out = at::empty({batch, q_heads, dim}, query.options());
  at::Tensor lse = at::empty({batch, q_heads}, query.options());
  std::vector<float> level(D);
  for (int64_t row = 0; row < batch * q_heads; ++row) {
    const int64_t b = row / q_heads;
    const int kvh = static_cast<int>(row % q_heads) / G;
    const float* own_k_row = own_k.data_ptr<float>() + (b * heads + kvh) * D;
    const float* own_v_row = own_v.data_ptr<float>() + (b * heads + kvh) * D;
    const float own_score = row_dot(query.data_ptr<float>() + row * D, own_k_row, D) * scale;
    const int64_t first = row * splits;
    const SplitMerge m = merge_splits(max_out.data() + first, sum_out.data() + first, static_cast<int>(splits), own_score);
    std::vector<float> pred(D, 0.f);
    std::fill(level.begin(), level.end(), 0.f);
    for (int64_t s = 0; s < splits; ++s) {
      const float w = split_weight(m, max_out[first + s]);
      for (int d = 0; d < D; ++d) {
        level[d] += w * acc_out[(first + s) * D + d];
        if (vs.has_pred) pred[d] += w * pred_out[(first + s) * D + d];
      }
    }
    for (int d = 0; d < D; ++d) {
      const float cached = inverse_dot(level.data(), vs.inverse + static_cast<int64_t>(kvh) * D * D, d, D) +
                           vs.mean[kvh * D + d] * m.mass + pred[d];
      out.data_ptr<float>()[row * D + d] = merged_output(m, cached, own_v_row[d]);
    }
    lse.data_ptr<float>()[row] = merged_lse(m);
  }
  return {out.to(query_in.scalar_type()), lse};
}

}  // namespace
}  // namespace transform
}  // namespace seqkv

TORCH_LIBRARY(seqkv_host, m) {
  m.def(SEQKV_WRITE_TRANSFORM_SCHEMA);
  m.def(SEQKV_TRANSFORM_DECODE_SCHEMA);
}

TORCH_LIBRARY_IMPL(seqkv_host, CPU, m) {
  m.impl("write_transform_slots", &seqkv::transform::write_transform_slots_host);
  m.impl("transform_decode_attention", &seqkv::transform::transform_decode_attention_host);
}

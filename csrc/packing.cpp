// mr1fast.trainer._native: the per-step CPU data path of the packed forwards
// (mr1fast/trainer/packing.py holds the Python reference of both functions; the tests hold
// the two to identical results).
//
// rope_positions: the 3-D mRoPE position ids of a batch of left-padded prompts, as transformers'
//   Qwen2-VL / Qwen2.5-VL get_rope_index computes them for images: text tokens advance one
//   position on all three axes; a run of image tokens takes the next grid of image_grid_thw and
//   lays its tokens on the (t, h, w) grid (divided by the spatial merge size) from the current
//   position, which then advances by max(h, w).
// pack_layout: the layout of one packed row of completions with their prompts (shared: one
//   prompt per run of completions of the same prompt; else one prompt copy per completion).
#include <torch/extension.h>

#include <algorithm>
#include <vector>

namespace {

void check_cpu_long(const torch::Tensor& t, const char* name, int64_t dim) {
  TORCH_CHECK(t.device().is_cpu(), name, ": expected a CPU tensor");
  TORCH_CHECK(t.scalar_type() == torch::kLong, name, ": expected int64, got ", t.scalar_type());
  TORCH_CHECK(t.dim() == dim, name, ": expected ", dim, " dimensions, got ", t.dim());
  TORCH_CHECK(t.is_contiguous(), name, ": expected a contiguous tensor");
}

// (positions [3, P, L], next position [P]).
std::tuple<torch::Tensor, torch::Tensor> rope_positions(torch::Tensor input_ids,
                                                        torch::Tensor attention_mask,
                                                        torch::Tensor image_grid_thw,
                                                        int64_t image_token_id,
                                                        int64_t spatial_merge) {
  check_cpu_long(input_ids, "input_ids", 2);
  check_cpu_long(attention_mask, "attention_mask", 2);
  check_cpu_long(image_grid_thw, "image_grid_thw", 2);
  TORCH_CHECK(attention_mask.sizes() == input_ids.sizes(), "attention_mask: expected the shape of input_ids");
  TORCH_CHECK(image_grid_thw.size(1) == 3, "image_grid_thw: expected [N, 3]");
  TORCH_CHECK(spatial_merge > 0, "spatial_merge: expected > 0");
  const int64_t P = input_ids.size(0), L = input_ids.size(1), N = image_grid_thw.size(0);
  auto positions = torch::zeros({3, P, L}, torch::kLong);
  auto next = torch::zeros({P}, torch::kLong);
  const int64_t* ids = input_ids.data_ptr<int64_t>();
  const int64_t* mask = attention_mask.data_ptr<int64_t>();
  const int64_t* grid = image_grid_thw.data_ptr<int64_t>();
  int64_t* pos = positions.data_ptr<int64_t>();
  int64_t* nxt = next.data_ptr<int64_t>();
  const int64_t plane = P * L;
  int64_t g = 0;  // the next grid, shared across the batch as in get_rope_index
  for (int64_t p = 0; p < P; ++p) {
    const int64_t* row = ids + p * L;
    const int64_t* valid = mask + p * L;
    int64_t current = 0, top = -1, i = 0;
    auto put = [&](int64_t at, int64_t t, int64_t h, int64_t w) {
      pos[p * L + at] = t;
      pos[plane + p * L + at] = h;
      pos[2 * plane + p * L + at] = w;
      top = std::max(top, std::max(t, std::max(h, w)));
    };
    while (i < L) {
      if (!valid[i]) { ++i; continue; }
      if (row[i] != image_token_id) { put(i, current, current, current); ++current; ++i; continue; }
      // A run of image tokens (over the valid positions): one image.
      TORCH_CHECK(g < N, "image_grid_thw: prompt ", p, " has more image runs than the ", N, " grids");
      const int64_t gt = grid[3 * g], gh = grid[3 * g + 1] / spatial_merge, gw = grid[3 * g + 2] / spatial_merge;
      TORCH_CHECK(gt >= 1 && gh >= 1 && gw >= 1, "image_grid_thw: grid ", g,
                  " has an axis below 1 after the spatial merge");
      ++g;
      const int64_t count = gt * gh * gw;
      int64_t k = 0;
      while (i < L && (!valid[i] || row[i] == image_token_id)) {
        if (valid[i]) {
          TORCH_CHECK(k < count, "prompt ", p, ": an image run is longer than its grid's ", count, " tokens");
          put(i, current + k / (gh * gw), current + (k / gw) % gh, current + k % gw);
          ++k;
        }
        ++i;
      }
      TORCH_CHECK(k == count, "prompt ", p, ": an image run of ", k, " tokens, its grid has ", count);
      current += std::max(gh, gw);
    }
    nxt[p] = top + 1;
  }
  TORCH_CHECK(g == N, "image_grid_thw: ", N, " grids for ", g, " image runs");
  return {positions, next};
}

// Returns (source [T], position_ids [3, T], segment [T], kind [T], predictors [n],
// token_index [n], cu_seqlens [R + 1], seq_cu [S + 1], seq_prompt [S]).
std::vector<torch::Tensor> pack_layout(torch::Tensor rows, torch::Tensor prompt_of,
                                       torch::Tensor lengths, torch::Tensor prompt_len,
                                       torch::Tensor prompt_pos, torch::Tensor next_pos,
                                       int64_t C, bool shared) {
  check_cpu_long(rows, "rows", 1);
  check_cpu_long(prompt_of, "prompt_of", 1);
  check_cpu_long(lengths, "lengths", 1);
  check_cpu_long(prompt_len, "prompt_len", 1);
  check_cpu_long(prompt_pos, "prompt_pos", 3);
  check_cpu_long(next_pos, "next_pos", 1);
  const int64_t R = rows.size(0), B = prompt_of.size(0), P = prompt_len.size(0);
  const int64_t L = prompt_pos.size(2);
  TORCH_CHECK(lengths.size(0) == B, "lengths: expected one per completion");
  TORCH_CHECK(prompt_pos.size(0) == 3 && prompt_pos.size(1) == P, "prompt_pos: expected [3, P, L]");
  TORCH_CHECK(next_pos.size(0) == P, "next_pos: expected one per prompt");
  const int64_t* row = rows.data_ptr<int64_t>();
  const int64_t* of = prompt_of.data_ptr<int64_t>();
  const int64_t* len = lengths.data_ptr<int64_t>();
  const int64_t* plen = prompt_len.data_ptr<int64_t>();
  const int64_t* ppos = prompt_pos.data_ptr<int64_t>();
  const int64_t* pnext = next_pos.data_ptr<int64_t>();

  // Segments: [first row, end row) over `rows`.
  std::vector<int64_t> seg_start;
  int64_t T = 0, n = 0;
  for (int64_t j = 0; j < R; ++j) {
    const int64_t r = row[j];
    TORCH_CHECK(r >= 0 && r < B, "rows: ", r, " is not a completion index in [0, ", B, ")");
    const int64_t p = of[r];
    TORCH_CHECK(p >= 0 && p < P, "prompt_of: ", p, " is not a prompt index in [0, ", P, ")");
    TORCH_CHECK(len[r] >= 1 && len[r] <= C, "lengths: completion ", r, " has ", len[r], " tokens; expected 1..", C);
    TORCH_CHECK(plen[p] >= 1 && plen[p] <= L, "prompt_len: prompt ", p, " has ", plen[p], " tokens; expected 1..", L);
    if (!shared || j == 0 || of[row[j - 1]] != p) { seg_start.push_back(j); T += plen[p]; }
    T += len[r];
    n += len[r];
  }
  seg_start.push_back(R);
  const int64_t S = static_cast<int64_t>(seg_start.size()) - 1;
  auto opt = torch::TensorOptions().dtype(torch::kLong);
  auto source = torch::empty({T}, opt), positions = torch::empty({3, T}, opt);
  auto segment = torch::empty({T}, opt), kind = torch::empty({T}, opt);
  auto predictors = torch::empty({n}, opt), token_index = torch::empty({n}, opt);
  auto cu = torch::empty({R + 1}, opt), seq_cu = torch::empty({S + 1}, opt);
  auto seq_prompt = torch::empty({S}, opt);
  int64_t *src = source.data_ptr<int64_t>(), *pos = positions.data_ptr<int64_t>();
  int64_t *seg = segment.data_ptr<int64_t>(), *knd = kind.data_ptr<int64_t>();
  int64_t *pred = predictors.data_ptr<int64_t>(), *tok = token_index.data_ptr<int64_t>();
  int64_t *cus = cu.data_ptr<int64_t>(), *scu = seq_cu.data_ptr<int64_t>();
  int64_t *sp = seq_prompt.data_ptr<int64_t>();
  const int64_t plane = P * L;
  int64_t t = 0, m = 0;
  cus[0] = 0;
  for (int64_t s = 0; s < S; ++s) {
    const int64_t p = of[row[seg_start[s]]];
    sp[s] = p;
    scu[s] = t;
    const int64_t first = L - plen[p];  // left padding: the valid tokens are the last plen
    for (int64_t i = 0; i < plen[p]; ++i, ++t) {
      src[t] = p * L + first + i;
      for (int a = 0; a < 3; ++a) pos[a * T + t] = ppos[a * plane + p * L + first + i];
      seg[t] = s;
      knd[t] = -1;
    }
    const int64_t last = t - 1;  // the prompt's last position predicts every first token
    for (int64_t j = seg_start[s]; j < seg_start[s + 1]; ++j) {
      const int64_t r = row[j];
      for (int64_t i = 0; i < len[r]; ++i, ++t, ++m) {
        src[t] = plane + r * C + i;
        for (int a = 0; a < 3; ++a) pos[a * T + t] = pnext[p] + i;
        seg[t] = s;
        knd[t] = j - seg_start[s];
        pred[m] = i == 0 ? last : t - 1;
        tok[m] = r * C + i;
      }
      cus[j + 1] = m;
    }
  }
  scu[S] = t;
  return {source, positions, segment, kind, predictors, token_index, cu, seq_cu, seq_prompt};
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "mr1fast's native data path: mRoPE position ids and packing metadata (CPU)";
  m.def("rope_positions", &rope_positions, "3-D mRoPE positions of left-padded prompts",
        py::arg("input_ids"), py::arg("attention_mask"), py::arg("image_grid_thw"),
        py::arg("image_token_id"), py::arg("spatial_merge"));
  m.def("pack_layout", &pack_layout, "the layout of one packed row", py::arg("rows"),
        py::arg("prompt_of"), py::arg("lengths"), py::arg("prompt_len"), py::arg("prompt_pos"),
        py::arg("next_pos"), py::arg("C"), py::arg("shared"));
}

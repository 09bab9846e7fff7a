// Host emulation of opd_forward_sparse_kernel and row_topk_kernel (opd_sparse.cuh) on one case
// written by check.py: reads the case file argv[1], writes the outputs to argv[2].
#include "emu_prelude.h"
#include "harness_main.h"
#include "kernels/cuda/opd_forward.cuh"
#include "kernels/cuda/opd_sparse.cuh"
#include <cstdio>
using namespace opd_fast;
using namespace opd_fast::kernels;

template <class scalar_t>
void run(const char* p, const int64_t* h, double temperature, FILE* out) {
  using acc_t = typename Element<scalar_t>::acc_t;
  const int64_t N = h[1], V = h[2], k = h[3], W = 2 * k;
  std::vector<__int128> sbuf((N * V * sizeof(scalar_t) + 15) / 16 + 1);
  std::memcpy(sbuf.data(), p, N * V * sizeof(scalar_t)); p += N * V * sizeof(scalar_t);
  auto read_i64 = [&](int64_t n) { std::vector<int64_t> v(n); std::memcpy(v.data(), p, n * 8); p += n * 8; return v; };
  auto read_acc = [&](int64_t n) { std::vector<acc_t> v(n); std::memcpy(v.data(), p, n * sizeof(acc_t)); p += n * sizeof(acc_t); return v; };
  auto sid_in = read_i64(N * k), tid_in = read_i64(N * k);
  auto tlq = read_acc(N * k), slq = read_acc(N * k), tent = read_acc(N);
  auto sampled = read_i64(N);
  auto tslq = read_acc(N);
  std::vector<char> valid(N); std::memcpy(valid.data(), p, N); p += N;
  std::vector<acc_t> loss(N, -7), metrics(N * kNumMetrics, -7), slse(N, -7), tlse(N, -7), gs(N, -7), coef(N * W, -7), smax(N, -7), snorm(N, -7);
  std::vector<int64_t> sid(N * W, -7);
  SparseForwardParams<scalar_t> fp{};
  fp.student = reinterpret_cast<const scalar_t*>(sbuf.data()); fp.student_row_stride = V;
  fp.rows = N; fp.vocab = V; fp.student_topk_ids = sid_in.data(); fp.teacher_topk_ids = tid_in.data();
  fp.teacher_topk_log_probs = tlq.data(); fp.teacher_log_probs_at_student = slq.data();
  fp.teacher_entropy = tent.data();
  fp.sampled_ids = h[6] ? sampled.data() : nullptr;
  fp.teacher_sampled_log_probs = h[6] ? tslq.data() : nullptr;
  fp.row_valid = h[7] ? reinterpret_cast<const bool*>(valid.data()) : nullptr;
  fp.k = int(k); fp.variant = Variant(h[4]); fp.estimator = Estimator(h[5]);
  fp.inv_tau = acc_t(1) / acc_t(temperature);
  fp.out = {int(W), loss.data(), metrics.data(), slse.data(), tlse.data(), gs.data(), sid.data(), coef.data(), smax.data(), snorm.data()};
  for (int64_t row = 0; row < N; ++row) emu_run_block(unsigned(row), [&] { opd_forward_sparse_kernel<scalar_t>(fp); });
  fwrite(loss.data(), sizeof(acc_t), N, out); fwrite(metrics.data(), sizeof(acc_t), N * kNumMetrics, out);
  fwrite(slse.data(), sizeof(acc_t), N, out); fwrite(tlse.data(), sizeof(acc_t), N, out);
  fwrite(gs.data(), sizeof(acc_t), N, out); fwrite(sid.data(), 8, N * W, out);
  fwrite(coef.data(), sizeof(acc_t), N * W, out);
  fwrite(smax.data(), sizeof(acc_t), N, out); fwrite(snorm.data(), sizeof(acc_t), N, out);

  // row_topk of the same student rows.
  std::vector<int64_t> ids(N * k, -7);
  std::vector<acc_t> log_probs(N * k, -7), lse(N, -7), entropy(N, -7);
  TopkParams<scalar_t> tp{};
  tp.logits = fp.student; tp.row_stride = V; tp.rows = N; tp.vocab = V; tp.k = int(k);
  tp.inv_tau = fp.inv_tau; tp.ids = ids.data(); tp.log_probs = log_probs.data();
  tp.lse = lse.data(); tp.entropy = entropy.data();
  with_topk_slots(int(k), [&](auto slots, int kpad) {
    for (int64_t row = 0; row < N; ++row) {
      emu_run_block(unsigned(row), [&] { row_topk_kernel<scalar_t, decltype(slots)::value>(tp, kpad); });
    }
  });
  fwrite(ids.data(), 8, N * k, out); fwrite(log_probs.data(), sizeof(acc_t), N * k, out);
  fwrite(lse.data(), sizeof(acc_t), N, out); fwrite(entropy.data(), sizeof(acc_t), N, out);
}

int main(int argc, char** argv) {
  return harness_main(argc, argv, 8, [](auto element, const char* body, const int64_t* header,
                                              double temperature, FILE* out) {
    run<decltype(element)>(body, header, temperature, out);
  });
}

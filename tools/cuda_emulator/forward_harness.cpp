// Host emulation of opd_forward_kernel and opd_backward_kernel (opd_forward.cuh,
// opd_backward.cuh) on one case written by check.py: reads argv[1], writes the outputs to
// argv[2]. The backward runs from the CPU op's forward results, so each kernel is checked alone,
// or (header word 17 set) from the emulated forward's own, for the end-to-end device numerics.
#include "emu_prelude.h"
#include "harness_main.h"
#include "kernels/cuda/opd_forward.cuh"
#include "kernels/cuda/opd_backward.cuh"
#include <cstdio>
using namespace opd_fast;
using namespace opd_fast::kernels;

template <class scalar_t>
void run(const char* data, const int64_t* h, double temperature, FILE* out) {
  using acc_t = typename Element<scalar_t>::acc_t;
  const int64_t N = h[1], V = h[2], k = h[3];
  const int64_t so = h[8], ss = h[9], to = h[10], ts = h[11], sb = h[12], tb = h[13], W = h[14];
  const bool full = h[15] != 0;
  const char* p = data;
  // Buffers copied into 16-byte aligned storage so the offsets decide the alignment.
  std::vector<__int128> sbuf((sb * sizeof(scalar_t) + 15) / 16 + 1), tbuf((tb * sizeof(scalar_t) + 15) / 16 + 1);
  std::memcpy(sbuf.data(), p, sb * sizeof(scalar_t)); p += sb * sizeof(scalar_t);
  std::memcpy(tbuf.data(), p, tb * sizeof(scalar_t)); p += tb * sizeof(scalar_t);
  std::vector<int64_t> sampled(N); std::memcpy(sampled.data(), p, N * 8); p += N * 8;
  std::vector<char> valid(N); std::memcpy(valid.data(), p, N); p += N;
  auto read_acc = [&](int64_t n) { std::vector<acc_t> v(n); std::memcpy(v.data(), p, n * sizeof(acc_t)); p += n * sizeof(acc_t); return v; };
  std::vector<acc_t> grad_loss = read_acc(N), max_in = read_acc(N), log_norm_in = read_acc(N), scale_in = read_acc(N);
  std::vector<int64_t> sid_in(N * W); std::memcpy(sid_in.data(), p, N * W * 8); p += N * W * 8;
  std::vector<acc_t> coef_in = read_acc(N * W);

  const scalar_t* student = reinterpret_cast<const scalar_t*>(sbuf.data()) + so;
  const scalar_t* teacher = reinterpret_cast<const scalar_t*>(tbuf.data()) + to;
  std::vector<acc_t> loss(N, -7), metrics(N * kNumMetrics, -7), slse(N, -7), tlse(N, -7), gs(N, -7), coef(N * W, -7), smax(N, -7), snorm(N, -7);
  std::vector<int64_t> sid(N * W, -7);
  ForwardParams<scalar_t> fp{};
  fp.student = student; fp.teacher = teacher; fp.student_row_stride = ss; fp.teacher_row_stride = ts;
  fp.rows = N; fp.vocab = V; fp.sampled_ids = h[6] ? sampled.data() : nullptr;
  fp.row_valid = h[7] ? reinterpret_cast<const bool*>(valid.data()) : nullptr;
  fp.k = int(k); fp.variant = Variant(h[4]); fp.estimator = Estimator(h[5]);
  fp.inv_tau = acc_t(1) / acc_t(temperature);
  fp.out = {int(W), loss.data(), metrics.data(), slse.data(), tlse.data(), gs.data(), sid.data(), coef.data(), smax.data(), snorm.data()};
  with_topk_slots(int(k), [&](auto slots, int kpad) {
    for (int64_t row = 0; row < N; ++row) {
      emu_run_block(unsigned(row), [&] {
        if (full) opd_forward_kernel<scalar_t, decltype(slots)::value, true>(fp, kpad);
        else opd_forward_kernel<scalar_t, decltype(slots)::value, false>(fp, kpad);
      });
    }
  });
  // Backward from the given (CPU) forward results. Gradient buffer offset by h[16] elements
  // so its alignment can differ from the logits'.
  const int64_t go = h[16];
  const bool chain = h[17] != 0;
  std::vector<__int128> gbuf((N * V + go) * sizeof(scalar_t) / 16 + 2);
  scalar_t* grad = reinterpret_cast<scalar_t*>(gbuf.data()) + go;
  BackwardParams<scalar_t> bp{};
  bp.student = student; bp.teacher = full ? teacher : nullptr; bp.student_row_stride = ss;
  bp.teacher_row_stride = full ? ts : 0; bp.rows = N; bp.vocab = V; bp.inv_tau = acc_t(1) / acc_t(temperature);
  bp.full_vocab = full; bp.grad_loss = grad_loss.data();
  bp.sparse_is_gradient = Estimator(h[5]) == Estimator::kTail;
  bp.student_max = chain ? smax.data() : max_in.data();
  bp.student_log_norm = chain ? snorm.data() : log_norm_in.data();
  bp.grad_scale = chain ? gs.data() : scale_in.data();
  bp.sparse_id = chain ? sid.data() : sid_in.data();
  bp.sparse_coef = chain ? coef.data() : coef_in.data();
  bp.sparse_width = int(W); bp.grad_student = grad;
  for (int64_t row = 0; row < N; ++row) {
    emu_run_block(unsigned(row), [&] {
      if (full) opd_backward_kernel<scalar_t, true>(bp);
      else opd_backward_kernel<scalar_t, false>(bp);
    });
  }
  fwrite(loss.data(), sizeof(acc_t), N, out); fwrite(metrics.data(), sizeof(acc_t), N * kNumMetrics, out);
  fwrite(slse.data(), sizeof(acc_t), N, out); fwrite(tlse.data(), sizeof(acc_t), N, out);
  fwrite(gs.data(), sizeof(acc_t), N, out); fwrite(sid.data(), 8, N * W, out);
  fwrite(coef.data(), sizeof(acc_t), N * W, out);
  fwrite(smax.data(), sizeof(acc_t), N, out); fwrite(snorm.data(), sizeof(acc_t), N, out);
  fwrite(grad, sizeof(scalar_t), N * V, out);
}

int main(int argc, char** argv) {
  return harness_main(argc, argv, 18, [](auto element, const char* body, const int64_t* header,
                                              double temperature, FILE* out) {
    run<decltype(element)>(body, header, temperature, out);
  });
}

// Torch-free test of the CPU row kernels (kernels/cpu/kernels.h) against a naive double-precision
// computation: top-k sets with lower-id ties, log-partition, entropy, and the full-vocab loss.
#include <algorithm>
#include <cmath>
#include <cstdio>
#include <numeric>
#include <random>
#include <vector>

#include "kernels/cpu/kernels.h"

namespace {

using opd_fast::cpu::ElementType;

int failures = 0;

void expect_near(double got, double want, double tolerance, const char* what) {
  if (got == want) return;  // also -inf == -inf
  if (!(std::fabs(got - want) <= tolerance * (1.0 + std::fabs(want)))) {
    std::printf("FAIL %s: got %.9g want %.9g\n", what, got, want);
    ++failures;
  }
}

std::vector<int64_t> naive_topk(const std::vector<float>& row, int k) {
  std::vector<int64_t> ids(row.size());
  std::iota(ids.begin(), ids.end(), 0);
  std::stable_sort(ids.begin(), ids.end(), [&](int64_t a, int64_t b) { return row[a] > row[b]; });
  ids.resize(k);
  return ids;
}

void naive_softmax_stats(const std::vector<float>& row, double tau, double* lse, double* entropy) {
  double max = -INFINITY;
  for (float x : row) max = std::max(max, x / tau);
  double sum = 0, spread = 0;
  for (float x : row) {
    const double e = std::exp(x / tau - max);
    sum += e;
    if (e > 0) spread += e * (x / tau - max);
  }
  *lse = max + std::log(sum);
  *entropy = std::log(sum) - spread / sum;
}

void test_topk_rows(int vocab, int k, double tau, bool ties, unsigned seed) {
  std::mt19937 generator(seed);
  std::normal_distribution<float> normal(0.0f, 3.0f);
  std::vector<float> row(vocab);
  for (auto& x : row) x = ties ? std::round(normal(generator)) : normal(generator);
  for (int i = 0; i < vocab; i += 11) row[i] = -INFINITY;  // masked vocabulary

  std::vector<int64_t> ids(k);
  std::vector<float> log_probs(k);
  float lse = 0, entropy = 0;
  opd_fast::cpu::TopkArgs args{};
  args.dtype = ElementType::kFloat32;
  args.logits = row.data();
  args.row_stride = vocab;
  args.vocab = vocab;
  args.k = k;
  args.temperature = tau;
  args.ids = ids.data();
  args.log_probs = log_probs.data();
  args.lse = &lse;
  args.entropy = &entropy;
  opd_fast::cpu::run_rows(args, 0, 1);

  const std::vector<int64_t> expected = naive_topk(row, k);
  if (ids != expected) {
    std::printf("FAIL top-k ids (V=%d k=%d ties=%d)\n", vocab, k, int(ties));
    ++failures;
  }
  double want_lse = 0, want_entropy = 0;
  naive_softmax_stats(row, tau, &want_lse, &want_entropy);
  expect_near(lse, want_lse, 1e-5, "lse");
  expect_near(entropy, want_entropy, 1e-4, "entropy");
  for (int i = 0; i < k; ++i) {
    expect_near(log_probs[i], row[expected[i]] / tau - want_lse, 1e-5, "top-k log-prob");
  }
}

void test_full_vocab_loss(int vocab, unsigned seed) {
  std::mt19937 generator(seed);
  std::normal_distribution<float> normal(0.0f, 2.0f);
  std::vector<float> student(vocab), teacher(vocab);
  for (int i = 0; i < vocab; ++i) {
    student[i] = normal(generator);
    teacher[i] = student[i] + normal(generator);
  }
  const int k = 4, width = 2 * k;
  float loss = 0, student_lse = 0, teacher_lse = 0, grad_scale = 0, student_max = 0, log_norm = 0;
  std::vector<float> metrics(opd_fast::kNumMetrics), coef(width);
  std::vector<int64_t> sparse_id(width);
  opd_fast::cpu::ForwardArgs args{};
  args.dtype = ElementType::kFloat32;
  args.student = student.data();
  args.teacher = teacher.data();
  args.student_row_stride = args.teacher_row_stride = vocab;
  args.vocab = vocab;
  args.k = k;
  args.variant = opd_fast::Variant::kFullVocab;
  args.estimator = opd_fast::Estimator::kPg;
  args.temperature = 1.0;
  args.out = {width,           &loss,       metrics.data(), &student_lse, &teacher_lse,
              &grad_scale,     sparse_id.data(), coef.data(), &student_max, &log_norm};
  opd_fast::cpu::run_rows(args, 0, 1);

  double lse_p = 0, lse_q = 0, unused = 0;
  naive_softmax_stats(student, 1.0, &lse_p, &unused);
  naive_softmax_stats(teacher, 1.0, &lse_q, &unused);
  double kl = 0, mean_gap = 0, max = student[0];
  for (int i = 0; i < vocab; ++i) {
    const double log_p = student[i] - lse_p, log_q = teacher[i] - lse_q;
    kl += std::exp(log_p) * (log_p - log_q);
    mean_gap += std::exp(log_p) * (student[i] - teacher[i]);
    max = student[i] > max ? student[i] : max;
  }
  expect_near(loss, kl, 1e-4, "full-vocab KL");
  expect_near(grad_scale, -mean_gap, 1e-4, "full-vocab C = -E_p[z - u]");
  expect_near(student_max, max, 0, "student max");
  expect_near(log_norm, lse_p - max, 1e-5, "student log_norm");
}

}  // namespace

int main() {
  std::printf("CPU kernels dispatch to: %s\n", opd_fast::cpu::instruction_set());
  test_topk_rows(1000, 16, 1.0, false, 1);
  test_topk_rows(1000, 16, 0.7, true, 2);
  test_topk_rows(5000, 64, 1.3, true, 3);
  test_topk_rows(17, 17, 1.0, true, 4);
  test_topk_rows(151936, 16, 1.0, false, 5);
  test_full_vocab_loss(3000, 6);
  if (failures) {
    std::printf("%d failure(s)\n", failures);
    return 1;
  }
  std::printf("all CPU row-kernel checks passed\n");
  return 0;
}

// The names C++ and Python share: the loss variants, the estimators, the per-token metrics and
// the largest k, each written once here. The enums index the name tables; parse_variant /
// parse_estimator (launchers/checks.h) read them, and opd_fast._C exports them (variants,
// estimators, token_metric_names, max_k) so that Python checks at import that its lists agree.
// Torch-free, host and device.
#pragma once

namespace opd_fast {

enum class Variant : int {
  kStudentTopk,
  kTeacherTopk,
  kOverlapTopk,
  kNonoverlapTopk,
  kUnionTopk,
  kFullVocab,
  kSampledToken,
  kNumVariants,
};
constexpr const char* kVariantNames[] = {"student_topk",    "teacher_topk", "overlap_topk",
                                         "nonoverlap_topk", "union_topk",   "full_vocab",
                                         "sampled_token"};

enum class Estimator : int { kPg, kExact, kTail, kNumEstimators };
constexpr const char* kEstimatorNames[] = {"pg", "exact", "tail"};

// Per-token metrics: the columns of the forward's metrics output.
enum Metric : int {
  kOverlapRatio,
  kOverlapMassStudent,
  kOverlapMassTeacher,
  kOverlapTokenAdvantage,
  kEntropyStudent,
  kEntropyTeacher,
  kEntropyGap,
  kStudentTopkMass,
  kTeacherTopkMass,
  kSampledTokenKl,
  kNumMetrics,
};
constexpr const char* kMetricNames[] = {
    "overlap_ratio",   "overlap_mass_student", "overlap_mass_teacher", "overlap_token_advantage",
    "entropy_student", "entropy_teacher",      "entropy_gap",          "student_topk_mass",
    "teacher_topk_mass", "sampled_token_kl"};

static_assert(sizeof(kVariantNames) / sizeof(kVariantNames[0]) == int(Variant::kNumVariants));
static_assert(sizeof(kEstimatorNames) / sizeof(kEstimatorNames[0]) ==
              int(Estimator::kNumEstimators));
static_assert(sizeof(kMetricNames) / sizeof(kMetricNames[0]) == kNumMetrics);

// Largest k the kernels accept; the candidate union holds at most 2 * kMaxK ids.
constexpr int kMaxK = 128;
constexpr int kMaxCandidates = 2 * kMaxK;

}  // namespace opd_fast

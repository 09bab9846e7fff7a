// Fills the kernels' argument structs from checked plans (checks.h) for both backends. The CPU
// kernels' structs (kernels/cpu/kernels.h, void pointers) and the CUDA kernels' (ForwardParams
// etc. in kernels/cuda/*.cuh, typed pointers) use the same field names, so one fill_args per op
// serves both; `point` casts each data pointer to its field's type. The fields only one backend
// has (the CPU's dtype and temperature, CUDA's rows and 1 / temperature) are set by its launcher.
#pragma once

#include <ATen/ATen.h>

#include "launchers/checks.h"

namespace opd_fast {

// field = t's data (nullptr for an undefined tensor), as the field's pointer type.
template <typename Pointer>
void point(Pointer& field, const at::Tensor& t) {
  field = t.defined() ? static_cast<Pointer>(t.data_ptr()) : nullptr;
}

// A (N, V) input whose rows are contiguous: its data and row stride (0 when undefined).
template <typename Pointer>
void point_rows(Pointer& field, int64_t& row_stride, const at::Tensor& t) {
  point(field, t);
  row_stride = t.defined() ? t.stride(0) : 0;
}

template <typename Args>
void set_teacher(Args& args, const ForwardPlan& plan) {
  point_rows(args.teacher, args.teacher_row_stride, plan.teacher);
}

template <typename Args>
void set_teacher(Args& args, const SparseForwardPlan& plan) {
  point(args.student_topk_ids, plan.student_topk_ids);
  point(args.teacher_topk_ids, plan.teacher_topk_ids);
  point(args.teacher_topk_log_probs, plan.teacher_topk_log_probs);
  point(args.teacher_log_probs_at_student, plan.teacher_log_probs_at_student);
  point(args.teacher_entropy, plan.teacher_entropy);
  point(args.teacher_sampled_log_probs, plan.teacher_sampled_log_probs);
}

// opd_forward (Plan = ForwardPlan) and opd_forward_sparse (SparseForwardPlan).
template <typename Args, typename Plan>
void fill_args(Args& args, const Plan& plan, const ForwardOutputTensors& outputs) {
  point_rows(args.student, args.student_row_stride, plan.student);
  args.vocab = plan.student.size(1);
  point(args.sampled_ids, plan.sampled_ids);
  point(args.row_valid, plan.row_valid);
  args.k = plan.k;
  args.variant = plan.variant;
  args.estimator = plan.estimator;
  args.out.sparse_width = plan.sparse_width;
  point(args.out.loss, outputs.loss);
  point(args.out.metrics, outputs.metrics);
  point(args.out.student_lse, outputs.student_lse);
  point(args.out.teacher_lse, outputs.teacher_lse);
  point(args.out.grad_scale, outputs.grad_scale);
  point(args.out.student_max, outputs.student_max);
  point(args.out.student_log_norm, outputs.student_log_norm);
  point(args.out.sparse_id, outputs.sparse_id);
  point(args.out.sparse_coef, outputs.sparse_coef);
  set_teacher(args, plan);
}

template <typename Args>
void fill_args(Args& args, const RowTopkPlan& plan, const RowTopkOutputTensors& outputs) {
  point_rows(args.logits, args.row_stride, plan.logits);
  args.vocab = plan.logits.size(1);
  args.k = plan.k;
  point(args.ids, outputs.ids);
  point(args.log_probs, outputs.log_probs);
  point(args.lse, outputs.lse);
  point(args.entropy, outputs.entropy);
}

template <typename Args>
void fill_args(Args& args, const BackwardPlan& plan, const at::Tensor& grad_student) {
  point_rows(args.student, args.student_row_stride, plan.student);
  point_rows(args.teacher, args.teacher_row_stride, plan.teacher);  // undefined without full_vocab
  args.vocab = plan.student.size(1);
  args.full_vocab = plan.full_vocab;
  args.sparse_is_gradient = plan.sparse_is_gradient;
  point(args.grad_loss, plan.grad_loss);
  point(args.student_max, plan.student_max);
  point(args.student_log_norm, plan.student_log_norm);
  point(args.grad_scale, plan.grad_scale);
  point(args.sparse_id, plan.sparse_id);
  point(args.sparse_coef, plan.sparse_coef);
  args.sparse_width = int(plan.sparse_id.size(1));
  point(args.grad_student, grad_student);
}

}  // namespace opd_fast

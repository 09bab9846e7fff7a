// The CPU backward's (N, V) gradient, from one block of memory the op keeps across calls.
//
// Why: a fresh (N, V) gradient is fresh memory, and on a VM whose host takes back the pages the
// guest frees (free page reporting: this machine's kernel runs with
// page_reporting.page_reporting_order=11) fresh memory can be slow to touch. Faulting in 594 MiB
// (N = 1,024, V = 151,936, fp32) took 0.06 s with transparent huge pages right after the last
// gradient was freed, but 0.6-1.8 s once that memory had sat free for 0.5-2 s, and 0.23-0.26 s
// with 4 KiB pages either way. Back to back the op reused the memory it had just freed; with
// other torch work in between (a training loop) it paid the slow case on most calls. A kept
// block is faulted in once.
//
// The block is handed out when nothing else holds it: the returned tensor holds the block until
// its storage dies (the user's gradient, its views, autograd's buffers), and a call made while
// the block is held gets an ordinary fresh tensor. Reuse never changes a value: the backward
// writes every element of its gradient. The block grows to the largest gradient asked for (up
// to a quarter of physical memory; larger ones are always fresh) and stays resident until
// release_cpu_workspace(): the op's memory between calls is one gradient.
#pragma once

#include <cstdint>

#include <ATen/ATen.h>

namespace opd_fast {

// An uninitialised contiguous CPU tensor of `sizes` and `options` (the gradient's).
at::Tensor cpu_gradient_buffer(at::IntArrayRef sizes, const at::TensorOptions& options);

// Bytes the kept block holds (0 when none), and whether a returned gradient holds it now.
int64_t cpu_workspace_bytes();
bool cpu_workspace_in_use();

// Frees the kept block now if nothing holds it (else when its holder dies); the next backward
// starts a new one.
void release_cpu_workspace();

}  // namespace opd_fast

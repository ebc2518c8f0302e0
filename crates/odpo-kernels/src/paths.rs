//! Which of the kernels' own paths ran: the counts the tests read, gathered in one value, so that a
//! step benchmark can say which paths a backend took in a step. A fused path that did not engage
//! (a kernel torch refused, a dtype or a mask that sent the work to the composed form) costs time
//! without an error; on a GPU machine, where time is scarce, the step's own counts say so at once,
//! where a profile of the kernels would take another run.

use serde::Serialize;

/// Calls of each path in this process; the attention's libtorch counts are the calling thread's
/// (a step on one device runs its forward and backward passes on the calling thread).
/// [`KernelPaths::since`] gives the calls of a piece of work.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub struct KernelPaths {
    /// Attention forward passes through the backend extension ([`crate::masked_attention`]).
    pub attention: usize,
    /// libtorch, under autodiff (the policy's forward pass): forward passes whose fused kernel was
    /// told the mask is causal, skipping the blocks of keys after each query.
    pub attention_causal: usize,
    /// libtorch: of those, the ones with no bias (rows without padding), whose kernels torch picks
    /// both ways as for PyTorch's own step.
    pub attention_causal_no_bias: usize,
    /// libtorch: forward passes whose kernel took grouped keys and values as they are.
    pub attention_grouped: usize,
    /// Backward passes through a fused body (libtorch's attention kernels, flex's loop).
    pub attention_fused_backward: usize,
    /// libtorch: backward passes that ran the fused forward kernel again, the forward pass having
    /// kept nothing (0 in a training step).
    pub attention_forward_reruns: usize,
    /// The target log-probabilities' CPU loops forward (flex, libtorch's f32 CPU tensors).
    pub logprobs_cpu_forward: usize,
    /// Their backward pass in place over the logits, or into a new buffer.
    pub logprobs_cpu_backward: usize,
    /// libtorch's other tensors (CUDA, half precision): the forward pass as torch operations.
    pub logprobs_torch_forward: usize,
    /// Their backward pass, over the logits' own buffer.
    pub logprobs_torch_backward_in_place: usize,
    /// Their backward pass into a copy of the logits (something else held them).
    pub logprobs_torch_backward_copy: usize,
    /// libtorch, half precision: RMSNorm forward passes through torch's own kernel.
    pub rms_norm_torch_forward: usize,
    /// Their backward passes through torch's kernel.
    pub rms_norm_torch_backward: usize,
    /// libtorch on CUDA: the gated unit's backward passes that read `a(g)` kept by the forward pass.
    pub glu_kept_activation: usize,
    /// libtorch: updates through PyTorch's fused AdamW kernel (one call covers many parameters).
    pub adamw_torch_fused: usize,
    /// libtorch: backward passes through torch's own record of an operation (the attention over
    /// rows without padding, RMSNorm in half precision on CUDA) handed the output's gradient by
    /// one dot product, the output and its gradient both contiguous.
    pub torch_record_dot: usize,
    /// The same, by an element-wise product summed (a strided output, as the attention's is, or
    /// two dtypes).
    pub torch_record_sum: usize,
}

impl KernelPaths {
    /// The counts now.
    pub fn now() -> Self {
        let (causal, causal_no_bias) = crate::causal_attention_kernels();
        let (cpu_forward, cpu_in_place, cpu_copy) = crate::token_logprob_kernel_calls();
        #[cfg(feature = "tch")]
        let ((torch_forward, torch_in_place, torch_copy), [rms_forward, rms_backward], glu_kept, adamw, [dot, sum]) =
            (crate::token_logprob_torch_calls(), crate::rms_norm::torch_calls(), crate::glu::kept_activations(), crate::fused_adamw_calls(), crate::torch_vjp_products());
        #[cfg(not(feature = "tch"))]
        let ((torch_forward, torch_in_place, torch_copy), [rms_forward, rms_backward], glu_kept, adamw, [dot, sum]) = ((0, 0, 0), [0, 0], 0, 0, [0, 0]);
        KernelPaths {
            attention: crate::masked_attention_calls(),
            attention_causal: causal,
            attention_causal_no_bias: causal_no_bias,
            attention_grouped: crate::grouped_attention_kernels(),
            attention_fused_backward: crate::fused_attention_backward_calls(),
            attention_forward_reruns: crate::fused_attention_forward_reruns(),
            logprobs_cpu_forward: cpu_forward,
            logprobs_cpu_backward: cpu_in_place + cpu_copy,
            logprobs_torch_forward: torch_forward,
            logprobs_torch_backward_in_place: torch_in_place,
            logprobs_torch_backward_copy: torch_copy,
            rms_norm_torch_forward: rms_forward,
            rms_norm_torch_backward: rms_backward,
            glu_kept_activation: glu_kept,
            adamw_torch_fused: adamw,
            torch_record_dot: dot,
            torch_record_sum: sum,
        }
    }

    /// The calls made since `before` (an earlier [`KernelPaths::now`]).
    pub fn since(self, before: KernelPaths) -> KernelPaths {
        let d = |now: usize, then: usize| now.saturating_sub(then);
        KernelPaths {
            attention: d(self.attention, before.attention),
            attention_causal: d(self.attention_causal, before.attention_causal),
            attention_causal_no_bias: d(self.attention_causal_no_bias, before.attention_causal_no_bias),
            attention_grouped: d(self.attention_grouped, before.attention_grouped),
            attention_fused_backward: d(self.attention_fused_backward, before.attention_fused_backward),
            attention_forward_reruns: d(self.attention_forward_reruns, before.attention_forward_reruns),
            logprobs_cpu_forward: d(self.logprobs_cpu_forward, before.logprobs_cpu_forward),
            logprobs_cpu_backward: d(self.logprobs_cpu_backward, before.logprobs_cpu_backward),
            logprobs_torch_forward: d(self.logprobs_torch_forward, before.logprobs_torch_forward),
            logprobs_torch_backward_in_place: d(self.logprobs_torch_backward_in_place, before.logprobs_torch_backward_in_place),
            logprobs_torch_backward_copy: d(self.logprobs_torch_backward_copy, before.logprobs_torch_backward_copy),
            rms_norm_torch_forward: d(self.rms_norm_torch_forward, before.rms_norm_torch_forward),
            rms_norm_torch_backward: d(self.rms_norm_torch_backward, before.rms_norm_torch_backward),
            glu_kept_activation: d(self.glu_kept_activation, before.glu_kept_activation),
            adamw_torch_fused: d(self.adamw_torch_fused, before.adamw_torch_fused),
            torch_record_dot: d(self.torch_record_dot, before.torch_record_dot),
            torch_record_sum: d(self.torch_record_sum, before.torch_record_sum),
        }
    }
}

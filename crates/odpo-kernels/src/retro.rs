//! The retro-forwards of the crate's memory-bound operations: under burn's gradient checkpointing
//! their outputs are not kept but computed again in the backward pass, from inputs the checkpointer
//! holds or itself computes again.

use burn::backend::Backend;
use burn::backend::autodiff::NodeId;
use burn::backend::autodiff::checkpoint::retro_forward::RetroForward;
use burn::backend::autodiff::checkpoint::state::BackwardStates;
use burn::backend::tensor::FloatTensor;

/// `op(x, param)` again, `x` the output of node `.0`.
#[derive(Debug)]
pub(crate) struct Unary<B: Backend, P>(pub NodeId, pub P, pub fn(FloatTensor<B>, P) -> FloatTensor<B>);

impl<B: Backend, P: Clone + std::fmt::Debug + Send + Sync + 'static> RetroForward for Unary<B, P> {
    fn forward(&self, states: &mut BackwardStates, out_node: NodeId) {
        let x = states.get_state(&self.0);
        states.save(out_node, (self.2)(x, self.1.clone()));
    }
}

/// `op(a, b, param)` again, `a` and `b` the outputs of nodes `.0` and `.1`.
#[derive(Debug)]
pub(crate) struct Binary<B: Backend, P>(pub NodeId, pub NodeId, pub P, pub fn(FloatTensor<B>, FloatTensor<B>, P) -> FloatTensor<B>);

impl<B: Backend, P: Clone + std::fmt::Debug + Send + Sync + 'static> RetroForward for Binary<B, P> {
    fn forward(&self, states: &mut BackwardStates, out_node: NodeId) {
        let (a, b) = (states.get_state(&self.0), states.get_state(&self.1));
        states.save(out_node, (self.3)(a, b, self.2.clone()));
    }
}

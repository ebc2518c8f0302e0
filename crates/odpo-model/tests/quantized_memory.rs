//! What a block-quantised weight costs on the device: about a byte a weight plus its scales, not
//! the f32 model's four, and not twice the values either (burn appends the scales to the values'
//! buffer, which doubles when it has no room for them, and flex keeps that buffer).
//!
//! Its own test binary: the allocator counting live bytes is process-wide.
#![allow(clippy::unwrap_used, clippy::expect_used, unsafe_code)]

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicUsize, Ordering};

use burn::tensor::Device;
use odpo_model::quantized::QuantBlocks;

/// The system allocator, counting the bytes currently allocated.
struct Counting;

static LIVE: AtomicUsize = AtomicUsize::new(0);

// SAFETY: every call goes to `System` unchanged; the counter only adds and subtracts sizes.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        LIVE.fetch_add(layout.size(), Ordering::Relaxed);
        unsafe { System.alloc(layout) }
    }
    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        LIVE.fetch_add(layout.size(), Ordering::Relaxed);
        unsafe { System.alloc_zeroed(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        LIVE.fetch_sub(layout.size(), Ordering::Relaxed);
        unsafe { System.dealloc(ptr, layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        LIVE.fetch_add(new_size, Ordering::Relaxed);
        LIVE.fetch_sub(layout.size(), Ordering::Relaxed);
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static ALLOC: Counting = Counting;

#[test]
fn a_q8_0_weight_on_flex_takes_a_byte_and_its_scales_per_weight() {
    let device = Device::flex();
    let (out, inp) = (1024, 2048);
    let n = out * inp;
    let data: Vec<f32> = (0..n).map(|i| ((i * 7919 % 1000) as f32 - 500.0) / 1000.0).collect();
    let blocks = QuantBlocks::quantize_q8_0([out, inp], &data);
    drop(data);
    let before = LIVE.load(Ordering::Relaxed);
    let (weight, offsets) = blocks.to_device(&device);
    assert!(offsets.is_none());
    let held = LIVE.load(Ordering::Relaxed) - before;
    // One i8 a weight, the f16 scales burn appends to them (1/16 byte a weight) and flex's
    // decoded f32 scales (1/8): 1.19 bytes a weight. f32 would be 4.
    let per_weight = held as f64 / n as f64;
    assert!(per_weight < 1.25, "the device weight holds {held} bytes, {per_weight:.3} a weight");
    assert!(per_weight > 1.0, "{per_weight:.3} bytes a weight: the values are not all held");
    // And its values are the blocks'.
    let got = weight.dequantize().into_data().try_into_vec::<f32>().unwrap();
    let want = blocks.dequantize();
    assert_eq!(got.len(), n);
    // `to_device` lays the weight out `[in, out]`.
    for (o, i) in [(0, 0), (3, 17), (out - 1, inp - 1), (511, 1000)] {
        assert_eq!(got[i * out + o], want[o * inp + i], "element ({o}, {i})");
    }
}

//! Overlapped forward (opt-in: [`DeviceInputs::set_overlap`](super::DeviceInputs::set_overlap)
//! or `NSA_FWD_OVERLAP=<chunks>`; measured on the H100 without gain, bench/NOTES-cuda.md v18
//! outcome: the kernels of the two streams do not co-run).
//!
//! The forward's kernels are bound by different units: the compressed attention and the top-n
//! scoring by the tensor cores (~8 + 9.5 ms at 64k, G = 16), the position-major selected
//! attention by L2 throughput (~25 ms: its block gathers), the window by neither much. Run one
//! after the other they add up. Here the row tiles are cut into chunks and two streams pipeline
//! them: stream A runs `cmp_attn` then `cmp_topn` of chunk c and records an event; stream B (the
//! higher priority, so its CTAs take SM slots as soon as A's retire) waits for it and runs
//! `sel_attn` and `win_attn` of chunk c, while A goes on with chunk c + 1. Every output row is
//! still written in the sequential order (compressed `=`, selected `+=`, window `+=`): a row
//! belongs to one chunk, and the chunk's B kernels start after its A kernels. Deterministic as the
//! sequential forward (each row's arithmetic is unchanged).
//!
//! Used only with the position-major selected attention (G >= 16 by default; the block-outer path
//! for small G runs unchunked after the top-n).

use super::{driver_err, CudaContext};
use crate::error::Result;
use cudarc::driver::{CudaEvent, CudaSlice, CudaStream};
use std::collections::HashMap;
use std::ops::Range;
use std::sync::Arc;

/// Chunks of the overlapped forward from `NSA_FWD_OVERLAP` (0 or unset: sequential forward).
pub fn chunks_from_env() -> usize {
    std::env::var("NSA_FWD_OVERLAP")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

/// One chunk: a range of the row tiles (`tiles64`: its compressed attention and top-n), the
/// range of the reordered selection list it runs, and the row tiles whose window attention runs
/// right after that selection (each tile's window waits for every selection item touching its
/// rows, so each row's sum keeps the sequential order: compressed, selected, window).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Chunk {
    pub tiles: Range<usize>,
    pub sel: Range<usize>,
    pub win: Range<usize>,
}

/// Splits the `n64 = tiles64.len() / 4` row tiles (entries `(seq start, len, t0, cstart)`,
/// `positions_64` positions each) into `chunks` ranges of about equal count, and reorders the
/// selection items (`(seq start, len, t0, 0)`, `sel_positions` positions each) so that chunk c's
/// items are contiguous. An item goes to the latest chunk among the tiles of its first and last
/// positions: all of its positions' top-n are done when that chunk's event fires. A tile's window
/// runs after the latest chunk holding an item that touches it (an item spans consecutive
/// positions of one sequence, and chunk order follows position order there, so these chunks
/// grow with the tile's and the window ranges are contiguous). Returns the chunks and the
/// reordered selection list.
pub(crate) fn plan(
    tiles64: &[i32],
    tiles_sel: &[i32],
    positions_64: usize,
    sel_positions: usize,
    chunks: usize,
) -> (Vec<Chunk>, Vec<i32>) {
    let n64 = tiles64.len() / 4;
    let nc = chunks.clamp(1, n64.max(1));
    let bounds: Vec<usize> = (0..=nc).map(|c| c * n64 / nc).collect();
    let chunk_of_tile = |i: usize| bounds.partition_point(|&b| b <= i) - 1;
    // (seq start, t0 of the tile) -> tile index
    let tile_at: HashMap<(i32, i32), usize> = tiles64
        .chunks_exact(4)
        .enumerate()
        .map(|(i, t)| ((t[0], t[2]), i))
        .collect();
    let p64 = positions_64 as i32;
    let mut per_chunk: Vec<Vec<i32>> = vec![Vec::new(); nc];
    // per chunk: the latest chunk whose selection touches its rows (at least itself)
    let mut win_after: Vec<usize> = (0..nc).collect();
    for item in tiles_sel.chunks_exact(4) {
        let (start, len, t0) = (item[0], item[1], item[2]);
        let last = (t0 + sel_positions as i32 - 1).min(len - 1);
        let ends = [t0, last].map(|t| {
            tile_at
                .get(&(start, t - t % p64))
                .map_or(nc - 1, |&i| chunk_of_tile(i))
        });
        let (lo, c) = (ends[0].min(ends[1]), ends[0].max(ends[1]));
        per_chunk[c].extend_from_slice(item);
        for w in &mut win_after[lo..=c] {
            *w = (*w).max(c);
        }
    }
    let mut out = Vec::with_capacity(tiles_sel.len());
    let mut list = Vec::with_capacity(nc);
    let mut win_next = 0; // the first chunk whose window is not scheduled yet
    for (c, items) in per_chunk.into_iter().enumerate() {
        let a = out.len() / 4;
        out.extend(items);
        let w0 = win_next;
        while win_next < nc && win_after[win_next] <= c {
            win_next += 1;
        }
        list.push(Chunk {
            tiles: bounds[c]..bounds[c + 1],
            sel: a..out.len() / 4,
            win: bounds[w0]..bounds[win_next],
        });
    }
    (list, out)
}

/// The second stream, the chunk plan, the reordered selection list and the events.
pub(crate) struct Overlap {
    pub stream: Arc<CudaStream>,
    pub chunks: Vec<Chunk>,
    pub tiles_sel: CudaSlice<i32>,
    /// one per chunk: its compressed attention and top-n are done (stream A)
    pub ready: Vec<CudaEvent>,
    /// stream B's last kernel is done
    pub done: CudaEvent,
}

impl Overlap {
    /// Plans `chunks` chunks over the host copies of the work lists and creates the stream
    /// (highest priority the device offers) and events.
    pub fn new(
        ctx: &CudaContext,
        tiles64: &[i32],
        tiles_sel: &[i32],
        positions_64: usize,
        sel_positions: usize,
        chunks: usize,
    ) -> Result<Self> {
        let (list, sel) = plan(tiles64, tiles_sel, positions_64, sel_positions, chunks);
        let stream = ctx.high_priority_stream()?;
        let sel = if sel.is_empty() { vec![0; 4] } else { sel };
        let tiles_sel = ctx.stream.clone_htod(&sel).map_err(driver_err)?;
        let ev = || ctx.ctx.new_event(None).map_err(driver_err);
        let ready = (0..list.len()).map(|_| ev()).collect::<Result<Vec<_>>>()?;
        Ok(Overlap {
            stream,
            chunks: list,
            tiles_sel,
            ready,
            done: ev()?,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Row tiles as `build_plan` makes them (longest rows first per sequence) and selection
    /// items (ascending), for `lens` sequences.
    fn lists(lens: &[usize], p64: usize, psel: usize) -> (Vec<i32>, Vec<i32>) {
        let (mut t64, mut tsel, mut start) = (Vec::new(), Vec::new(), 0usize);
        for &len in lens {
            for t0 in (0..len).step_by(p64).rev() {
                t64.extend([start as i32, len as i32, t0 as i32, 0]);
            }
            for t0 in (0..len).step_by(psel) {
                tsel.extend([start as i32, len as i32, t0 as i32, 0]);
            }
            start += len;
        }
        (t64, tsel)
    }

    #[test]
    fn every_selection_item_lands_once_in_a_chunk_that_covers_its_positions() {
        for (lens, p64, psel, nc) in [
            (vec![4096usize], 4usize, 4usize, 8usize), // G = 16
            (vec![1000, 37, 3, 700], 8, 8, 5),         // G = 8, varlen
            (vec![333], 64, 32, 3),                    // G = 1
            (vec![500, 90], 25, 12, 4),                // G = 5 (mt 2): items straddle tiles
            (vec![900, 133], 4, 16, 3),                // G = 16 at 256 rows: items span 4 tiles
            (vec![300, 7], 2, 32, 50),                 // items span 16 tiles, tiny chunks
            (vec![5], 4, 4, 16),                       // more chunks than tiles
        ] {
            let (t64, tsel) = lists(&lens, p64, psel);
            let (chunks, sel) = plan(&t64, &tsel, p64, psel, nc);
            // every tile's window runs once, after the selection of every item touching it
            let tile_of = |start: i32, t: i32| {
                t64.chunks_exact(4)
                    .position(|x| x[0] == start && x[2] == t - t % p64 as i32)
                    .unwrap()
            };
            let mut win_at = vec![usize::MAX; t64.len() / 4];
            for (c, ch) in chunks.iter().enumerate() {
                for t in ch.win.clone() {
                    assert_eq!(win_at[t], usize::MAX, "{lens:?}: tile {t} windowed twice");
                    win_at[t] = c;
                }
            }
            assert!(
                !win_at.contains(&usize::MAX),
                "{lens:?}: a window never runs"
            );
            for (c, ch) in chunks.iter().enumerate() {
                for it in sel[ch.sel.start * 4..ch.sel.end * 4].chunks_exact(4) {
                    for t in it[2]..(it[2] + psel as i32).min(it[1]) {
                        let tile = tile_of(it[0], t);
                        assert!(
                            win_at[tile] >= c,
                            "{lens:?}: window of tile {tile} before its item"
                        );
                    }
                }
            }
            // the chunks tile both lists exactly, in order
            assert_eq!(chunks.first().unwrap().tiles.start, 0);
            assert_eq!(chunks.last().unwrap().tiles.end, t64.len() / 4);
            assert_eq!(chunks.last().unwrap().sel.end, tsel.len() / 4);
            for w in chunks.windows(2) {
                assert_eq!(w[0].tiles.end, w[1].tiles.start);
                assert_eq!(w[0].sel.end, w[1].sel.start);
            }
            // the same items, each once
            let mut a: Vec<&[i32]> = tsel.chunks_exact(4).collect();
            let mut b: Vec<&[i32]> = sel.chunks_exact(4).collect();
            a.sort();
            b.sort();
            assert_eq!(a, b);
            // every position of an item is in a tile of its chunk or of an earlier one
            for (c, ch) in chunks.iter().enumerate() {
                for it in sel[ch.sel.start * 4..ch.sel.end * 4].chunks_exact(4) {
                    let (start, len, t0) = (it[0], it[1], it[2]);
                    for t in t0..(t0 + psel as i32).min(len) {
                        let tile = t64
                            .chunks_exact(4)
                            .position(|x| x[0] == start && x[2] == t - t % p64 as i32)
                            .unwrap();
                        let tc = chunks.iter().position(|k| k.tiles.contains(&tile)).unwrap();
                        assert!(
                            tc <= c,
                            "{lens:?}: item at {t0} in chunk {c}, position {t} in {tc}"
                        );
                    }
                }
            }
        }
    }
}

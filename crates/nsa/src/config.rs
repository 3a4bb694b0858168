//! `NsaConfig`: the hyper-parameters of one NSA attention op (SPEC.md, "Shapes and names").

use crate::error::{NsaError, Result};
use serde::{Deserialize, Serialize};

/// How the compression branch turns `l` consecutive keys (values) into one (SPEC.md, `phi`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum PhiKind {
    /// Average of the `l` tokens. No parameters.
    #[default]
    Mean,
    /// Flatten the block after adding a learned intra-block position encoding, then one matrix.
    Linear,
    /// The paper's: position encoding, flatten, linear, SiLU, linear (with biases).
    Mlp,
}

/// The hyper-parameters of NSA. Head dimensions are not part of it: they come with the tensors.
///
/// The JSON form (serde) uses exactly these field names; `scale` and `phi` are optional.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NsaConfig {
    /// Query heads `HQ`.
    pub heads: usize,
    /// Key/value heads `HKV` (`G = HQ / HKV`).
    pub kv_heads: usize,
    /// Compression block length `l`.
    pub cmp_block: usize,
    /// Compression stride `d`.
    pub cmp_stride: usize,
    /// Selection block length `l'`.
    pub sel_block: usize,
    /// Selected blocks per query `n`, forced ones included.
    pub sel_count: usize,
    /// Forced initial blocks `n_init`.
    pub init_blocks: usize,
    /// Forced local blocks `n_local` (ending at the query's own block).
    pub local_blocks: usize,
    /// Sliding window `w` in tokens, the query's own included.
    pub window: usize,
    /// Softmax scale; `None` means `1/sqrt(dk)`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub scale: Option<f64>,
    /// Compression function.
    #[serde(default)]
    pub phi: PhiKind,
}

impl Default for NsaConfig {
    /// The paper's configuration (64 query heads, 4 KV heads, l=32, d=16, l'=64, n=16, w=512).
    fn default() -> Self {
        NsaConfig {
            heads: 64,
            kv_heads: 4,
            cmp_block: 32,
            cmp_stride: 16,
            sel_block: 64,
            sel_count: 16,
            init_blocks: 1,
            local_blocks: 2,
            window: 512,
            scale: None,
            phi: PhiKind::Mean,
        }
    }
}

impl NsaConfig {
    /// A builder starting from the paper's defaults.
    pub fn builder() -> NsaConfigBuilder {
        NsaConfigBuilder {
            cfg: NsaConfig::default(),
        }
    }

    /// GQA group size `G = HQ / HKV`.
    pub fn group_size(&self) -> usize {
        self.heads / self.kv_heads
    }

    /// Softmax scale for query/key dim `dk`.
    pub fn softmax_scale(&self, dk: usize) -> f64 {
        self.scale.unwrap_or(1.0 / (dk as f64).sqrt())
    }

    /// Number of forced blocks at most (`n_init + n_local`).
    pub fn forced_blocks(&self) -> usize {
        self.init_blocks + self.local_blocks
    }

    /// Checks every rule of SPEC.md on the hyper-parameters.
    pub fn validate(&self) -> Result<()> {
        let nonzero = [
            ("heads", self.heads),
            ("kv_heads", self.kv_heads),
            ("cmp_block", self.cmp_block),
            ("cmp_stride", self.cmp_stride),
            ("sel_block", self.sel_block),
            ("sel_count", self.sel_count),
            ("window", self.window),
        ];
        for (name, v) in nonzero {
            if v == 0 {
                return Err(NsaError::ZeroSize(name));
            }
        }
        if !self.heads.is_multiple_of(self.kv_heads) {
            return Err(NsaError::HeadsNotDivisible {
                heads: self.heads,
                kv_heads: self.kv_heads,
            });
        }
        if !self.cmp_block.is_multiple_of(self.cmp_stride) {
            return Err(NsaError::StrideNotDividing {
                what: "cmp_block",
                block: self.cmp_block,
                stride: self.cmp_stride,
            });
        }
        if !self.sel_block.is_multiple_of(self.cmp_stride) {
            return Err(NsaError::StrideNotDividing {
                what: "sel_block",
                block: self.sel_block,
                stride: self.cmp_stride,
            });
        }
        if self.cmp_block > self.sel_block {
            return Err(NsaError::CmpBlockTooLarge {
                cmp_block: self.cmp_block,
                sel_block: self.sel_block,
            });
        }
        if self.sel_count < self.forced_blocks() {
            return Err(NsaError::TooFewSelected {
                sel_count: self.sel_count,
                init: self.init_blocks,
                local: self.local_blocks,
            });
        }
        if let Some(s) = self.scale {
            if !(s.is_finite() && s > 0.0) {
                return Err(NsaError::BadScale(s));
            }
        }
        Ok(())
    }

    /// Checks head dimensions (non-zero).
    pub fn validate_dims(&self, dk: usize, dv: usize) -> Result<()> {
        if dk == 0 {
            return Err(NsaError::ZeroSize("dk"));
        }
        if dv == 0 {
            return Err(NsaError::ZeroSize("dv"));
        }
        Ok(())
    }

    /// Reads and validates a JSON configuration.
    pub fn from_json(text: &str) -> Result<Self> {
        let cfg: NsaConfig = serde_json::from_str(text)?;
        cfg.validate()?;
        Ok(cfg)
    }
}

/// Builder for [`NsaConfig`]; `build()` validates.
#[derive(Debug, Clone)]
pub struct NsaConfigBuilder {
    cfg: NsaConfig,
}

macro_rules! setters {
    ($($name:ident: $ty:ty),* $(,)?) => {
        $(
            #[doc = concat!("Sets `", stringify!($name), "`.")]
            pub fn $name(mut self, v: $ty) -> Self {
                self.cfg.$name = v;
                self
            }
        )*
    };
}

impl NsaConfigBuilder {
    setters!(
        heads: usize,
        kv_heads: usize,
        cmp_block: usize,
        cmp_stride: usize,
        sel_block: usize,
        sel_count: usize,
        init_blocks: usize,
        local_blocks: usize,
        window: usize,
        phi: PhiKind,
    );

    /// Sets an explicit softmax scale.
    pub fn scale(mut self, s: f64) -> Self {
        self.cfg.scale = Some(s);
        self
    }

    /// Validates and returns the configuration.
    pub fn build(self) -> Result<NsaConfig> {
        self.cfg.validate()?;
        Ok(self.cfg)
    }
}

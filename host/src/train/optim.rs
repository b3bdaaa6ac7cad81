//! AdamW with decoupled weight decay (the update rule of candle-nn's AdamW and PyTorch's),
//! owned here because its state must be checkpointed and restored exactly.

use std::collections::HashMap;

use candle_core::backprop::GradStore;
use candle_core::{Tensor, Var};

use crate::models::weights::Result;

#[derive(Debug, Clone, Copy, PartialEq)]
pub struct AdamWParams {
    pub lr: f64,
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    pub weight_decay: f64,
}

pub struct AdamW {
    pub params: AdamWParams,
    vars: Vec<(String, Var)>,
    /// Each variable's learning rate as a multiple of the step's.
    lr_scale: Vec<f64>,
    m: Vec<Tensor>,
    v: Vec<Tensor>,
    /// Steps taken (for bias correction).
    pub t: u64,
}

impl AdamW {
    pub fn new(vars: Vec<(String, Var)>, params: AdamWParams) -> Result<Self> {
        let m = vars
            .iter()
            .map(|(_, v)| v.zeros_like())
            .collect::<candle_core::Result<Vec<_>>>()?;
        let v = vars
            .iter()
            .map(|(_, v)| v.zeros_like())
            .collect::<candle_core::Result<Vec<_>>>()?;
        Ok(Self {
            params,
            lr_scale: vec![1.0; vars.len()],
            vars,
            m,
            v,
            t: 0,
        })
    }

    /// Gives the variables whose names `which` accepts `factor` times the step's rate.
    pub fn scale_lr(&mut self, which: impl Fn(&str) -> bool, factor: f64) {
        for (i, (name, _)) in self.vars.iter().enumerate() {
            if which(name) {
                self.lr_scale[i] = factor;
            }
        }
    }

    /// One update; every variable must have a gradient in `grads`.
    pub fn step(&mut self, grads: &GradStore, lr: f64) -> Result<()> {
        self.t += 1;
        let p = self.params;
        let c1 = 1.0 - p.beta1.powi(self.t as i32);
        let c2 = 1.0 - p.beta2.powi(self.t as i32);
        for (i, (_, var)) in self.vars.iter().enumerate() {
            let Some(g) = grads.get(var.as_tensor()) else {
                continue;
            };
            let lr = lr * self.lr_scale[i];
            let m = ((&self.m[i] * p.beta1)? + (g * (1.0 - p.beta1))?)?;
            let v = ((&self.v[i] * p.beta2)? + (g.sqr()? * (1.0 - p.beta2))?)?;
            let update = ((&m / c1)? / ((&v / c2)?.sqrt()? + p.eps)?)?;
            let w = ((var.as_tensor() * (1.0 - lr * p.weight_decay))? - (update * lr)?)?;
            var.set(&w)?;
            self.m[i] = m;
            self.v[i] = v;
        }
        Ok(())
    }

    /// Moments keyed `m.NAME` / `v.NAME`, plus the step count.
    pub fn state(&self) -> (HashMap<String, Tensor>, u64) {
        let mut map = HashMap::new();
        for (i, (name, _)) in self.vars.iter().enumerate() {
            map.insert(format!("m.{name}"), self.m[i].clone());
            map.insert(format!("v.{name}"), self.v[i].clone());
        }
        (map, self.t)
    }

    pub fn restore(&mut self, state: &HashMap<String, Tensor>, t: u64) -> Result<()> {
        for (i, (name, var)) in self.vars.iter().enumerate() {
            for (slot, key) in [
                (&mut self.m[i], format!("m.{name}")),
                (&mut self.v[i], format!("v.{name}")),
            ] {
                let s =
                    state
                        .get(&key)
                        .ok_or_else(|| crate::models::ModelError::MissingTensor {
                            source_desc: "optimizer state".into(),
                            name: key.clone(),
                        })?;
                if s.dims() != var.dims() {
                    return Err(crate::models::ModelError::Shape {
                        source_desc: "optimizer state".into(),
                        name: key,
                        expected: var.dims().to_vec(),
                        found: s.dims().to_vec(),
                    });
                }
                *slot = s.clone();
            }
        }
        self.t = t;
        Ok(())
    }
}

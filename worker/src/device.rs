//! Choosing the compute device: `cpu` or `cuda:N`.

use std::fmt;
use std::str::FromStr;

use candle_core::Device;

use crate::{Error, Result};

/// A device as named on the command line.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeviceSpec {
    /// The CPU.
    Cpu,
    /// NVIDIA GPU number N (needs the `cuda` feature).
    Cuda(usize),
}

impl FromStr for DeviceSpec {
    type Err = Error;

    fn from_str(s: &str) -> Result<Self> {
        if s == "cpu" {
            return Ok(Self::Cpu);
        }
        match s.strip_prefix("cuda:").map(str::parse::<usize>) {
            Some(Ok(n)) => Ok(Self::Cuda(n)),
            _ => Err(Error::Device {
                device: s.to_string(),
                problem: "expected `cpu` or `cuda:N`".into(),
            }),
        }
    }
}

impl fmt::Display for DeviceSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Cpu => f.write_str("cpu"),
            Self::Cuda(n) => write!(f, "cuda:{n}"),
        }
    }
}

impl DeviceSpec {
    /// Opens the device. A GPU's gate kernels are compiled here, so a host whose CUDA toolkit
    /// cannot build them is refused at start rather than at the first step.
    pub fn open(self) -> Result<Device> {
        match self {
            Self::Cpu => Ok(Device::Cpu),
            #[cfg(feature = "cuda")]
            Self::Cuda(n) => {
                let failed = |problem: String| Error::Device {
                    device: self.to_string(),
                    problem,
                };
                let device = Device::new_cuda(n).map_err(|e| failed(e.to_string()))?;
                recur_core::fused::compile_cuda_kernels().map_err(|e| failed(e.to_string()))?;
                Ok(device)
            }
            #[cfg(not(feature = "cuda"))]
            Self::Cuda(_) => Err(Error::Device {
                device: self.to_string(),
                problem: "this build has no CUDA support; rebuild with `--features cuda`".into(),
            }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_and_refuses_cuda_without_the_feature() {
        assert_eq!("cpu".parse::<DeviceSpec>().unwrap(), DeviceSpec::Cpu);
        assert_eq!("cuda:1".parse::<DeviceSpec>().unwrap(), DeviceSpec::Cuda(1));
        assert!("gpu".parse::<DeviceSpec>().is_err());
        assert!(DeviceSpec::Cpu.open().is_ok());
        #[cfg(not(feature = "cuda"))]
        assert!(
            DeviceSpec::Cuda(0)
                .open()
                .unwrap_err()
                .to_string()
                .contains("--features cuda")
        );
    }
}

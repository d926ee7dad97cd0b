"""The DeepFashion metrics (FID, SSIM, PSNR, LPIPS) under the published protocols; needs nothing else of the
repository (docs/evaluation.md)."""

"""fedxvit: federated transfer learning of a hybrid CNN-ViT brain-MRI classifier on NVFlare."""

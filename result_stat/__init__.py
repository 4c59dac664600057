"""Result scripts: test report, cross-site table, TensorBoard plots, Grad-CAM."""

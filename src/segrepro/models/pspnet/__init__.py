"""PSPNet (Zhao et al., CVPR 2017): dilated ResNet + pyramid pooling module (`pspnet`)."""

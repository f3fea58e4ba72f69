"""The data's parts: the MNIST files, the pairs and loaders, people's pictures."""

"""mnist-adder: a network that reads an MNIST digit and a number 0-9 and predicts the digit and their sum."""

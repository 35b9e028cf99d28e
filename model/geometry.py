"""Receptive-field geometry of a stack of convolutions.

For layers l = 1..L with kernel k_l, stride s_l and padding-before p_l, the jump before
layer l is J_l = s_1 * ... * s_(l-1), and an output cell i covers input pixels
[i * S - P, i * S - P + R - 1] with

    S = prod s_l,   R = 1 + sum (k_l - 1) * J_l,   P = sum p_l * J_l.

Its centre, where DELF places the keypoint, is i * S + (R - 1) / 2 - P. These are the
numbers the official code hard-codes (291 / 32 / 145 for TF-slim ResNet block3); here they
are derived from the network and checked against input gradients in the tests.
"""


def receptive_field(conv_path):
    """(receptive field R, stride S, padding P) of a list of (kernel, stride, pad_before)."""
    rf, jump, pad = 1, 1, 0
    for kernel, stride, pad_before in conv_path:
        rf += (kernel - 1) * jump
        pad += pad_before * jump
        jump *= stride
    return rf, jump, pad


def centre_offset(rf, pad):
    """Pixel coordinate of the centre of cell 0; cell i is centred at i * stride + this."""
    return (rf - 1) / 2 - pad

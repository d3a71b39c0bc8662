// Reads a meshsign runner certificate with Go's crypto/x509 (what grpcurl, Go proxies and
// inspectors use) and prints its job-claims extension: the JSON in the UTF8String under
// 1.3.9999.4717.1.1. Exit 1 if the certificate does not parse or has no claims extension.
package main

import (
	"crypto/x509"
	"encoding/asn1"
	"encoding/pem"
	"fmt"
	"os"
)

var claimsOID = asn1.ObjectIdentifier{1, 3, 9999, 4717, 1, 1}

func main() {
	data, err := os.ReadFile(os.Args[1])
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(1)
	}
	block, _ := pem.Decode(data)
	if block == nil {
		fmt.Fprintln(os.Stderr, "no PEM block")
		os.Exit(1)
	}
	cert, err := x509.ParseCertificate(block.Bytes)
	if err != nil {
		fmt.Fprintln(os.Stderr, "parse:", err)
		os.Exit(1)
	}
	for _, ext := range cert.Extensions {
		if ext.Id.Equal(claimsOID) {
			var claims string
			if _, err := asn1.UnmarshalWithParams(ext.Value, &claims, "utf8"); err != nil {
				fmt.Fprintln(os.Stderr, "claims value:", err)
				os.Exit(1)
			}
			fmt.Printf("uri=%s\nclaims=%s\n", cert.URIs[0], claims)
			return
		}
	}
	fmt.Fprintln(os.Stderr, "no claims extension")
	os.Exit(1)
}
